//! Child processes: spawned from the main thread, killed on drop, peak RSS through a wrapper.
//!
//! Peak RSS comes from `getrusage(RUSAGE_CHILDREN)` in a small wrapper process (this binary's
//! hidden `wrap` subcommand) that runs the measured program as its only child: after waiting
//! for it, the wrapper's `ru_maxrss` for its children is exactly that program's peak. This
//! needs no `unsafe` (nix wraps getrusage safely) and no sampling of `/proc` that could miss the
//! last growth before exit.
//!
//! The wrapper dies with the harness (`PR_SET_PDEATHSIG`) and forwards SIGTERM to its child,
//! killing it after a grace period, so no child outlives a run that is interrupted or panics.

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a child asked to stop (SIGTERM) has before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How often exits are polled: the resolution of every measured duration.
const POLL: Duration = Duration::from_millis(1);

#[derive(Debug, clap::Args)]
pub struct WrapArgs {
    /// File that receives "PEAK_RSS_KIB EXIT_CODE USER_US SYSTEM_US" once the child has exited.
    #[arg(long)]
    rusage: PathBuf,
    /// The program and its arguments.
    #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// The `wrap` subcommand: runs the command, then records its peak RSS.
pub fn wrap(args: WrapArgs) -> ExitCode {
    match wrap_inner(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tube-bench wrap: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn wrap_inner(args: &WrapArgs) -> Result<u8> {
    // If the harness dies, so does this wrapper, and the SIGTERM handler below takes the child
    // down with it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).context("prctl(PR_SET_PDEATHSIG)")?;
    if nix::unistd::getppid() == Pid::from_raw(1) {
        bail!("the harness is gone");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        // Ctrl-C reaches the whole process group, the child included: just wait for it.
        let mut int = signal(SignalKind::interrupt())?;
        let mut child = tokio::process::Command::new(&args.command[0])
            .args(&args.command[1..])
            .spawn()
            .with_context(|| format!("cannot run {:?}", args.command[0]))?;
        let pid = Pid::from_raw(child.id().context("child has no pid")? as i32);
        loop {
            tokio::select! {
                status = child.wait() => break Ok::<_, anyhow::Error>(status?),
                _ = term.recv() => {
                    let _ = kill(pid, Signal::SIGTERM);
                    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                        Ok(status) => break Ok(status?),
                        Err(_) => {
                            let _ = child.kill().await;
                            break Ok(child.wait().await?);
                        }
                    }
                }
                _ = int.recv() => {}
            }
        }
    })?;
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    let code = exit_code(status);
    let micros = |t: nix::sys::time::TimeVal| t.tv_sec() * 1_000_000 + t.tv_usec();
    let line = format!(
        "{} {code} {} {}\n",
        usage.max_rss(),
        micros(usage.user_time()),
        micros(usage.system_time())
    );
    std::fs::write(&args.rusage, line)
        .with_context(|| format!("cannot write {}", args.rusage.display()))?;
    Ok(code)
}

fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        _ => 255,
    }
}

/// Builds the commands of one run: every child's stderr goes to a log file of its own, and
/// measured children run under the wrapper.
pub struct Spawner {
    /// This binary, for the wrapper and the helper subcommands.
    pub exe: PathBuf,
    /// Where logs and rusage files go for this run.
    pub dir: PathBuf,
}

impl Spawner {
    pub fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            exe: std::env::current_exe().context("cannot find this program")?,
            dir,
        })
    }

    /// A command for `program args`, wrapped for peak RSS when `measured`.
    pub fn command(&self, name: &str, program: &Path, args: &[OsString], measured: bool) -> Spec {
        let mut cmd = if measured {
            let mut c = Command::new(&self.exe);
            c.arg("wrap")
                .arg("--rusage")
                .arg(self.dir.join(format!("{name}.rusage")))
                .arg("--")
                .arg(program)
                .args(args);
            c
        } else {
            let mut c = Command::new(program);
            c.args(args);
            c
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        Spec {
            name: name.to_string(),
            cmd,
            rusage: measured.then(|| self.dir.join(format!("{name}.rusage"))),
            log: self.dir.join(format!("{name}.log")),
        }
    }

    /// A command running one of this binary's helper subcommands.
    pub fn helper(&self, name: &str, args: &[OsString], measured: bool) -> Spec {
        self.command(name, &self.exe.clone(), args, measured)
    }
}

/// A command about to be spawned.
pub struct Spec {
    name: String,
    cmd: Command,
    rusage: Option<PathBuf>,
    log: PathBuf,
}

impl Spec {
    pub fn stdin(mut self, from: impl Into<Stdio>) -> Self {
        self.cmd.stdin(from);
        self
    }

    pub fn stdout_piped(mut self) -> Self {
        self.cmd.stdout(Stdio::piped());
        self
    }

    /// Starts it. The command (and any pipe end it holds) is dropped here, so the harness
    /// keeps no pipe open that would hide an end of file.
    pub fn spawn(self) -> Result<Proc> {
        let Spec {
            name,
            mut cmd,
            rusage,
            log,
        } = self;
        let err = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stderr(err);
        if let Some(r) = &rusage {
            let _ = std::fs::remove_file(r);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name,
            child,
            rusage,
            log,
            status: None,
            exited: None,
        })
    }
}

/// A running child; asked to stop, then killed, when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    rusage: Option<PathBuf>,
    log: PathBuf,
    status: Option<ExitStatus>,
    exited: Option<Instant>,
}

impl Proc {
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The exit status, if it has exited (never blocks).
    pub fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none()
            && let Some(s) = self.child.try_wait()?
        {
            self.status = Some(s);
            self.exited = Some(Instant::now());
        }
        Ok(self.status)
    }

    /// When it was seen to have exited (to within the poll interval).
    pub fn exited_at(&self) -> Option<Instant> {
        self.exited
    }

    /// Waits for the exit until `deadline`; `None` if it is still running then.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(s) = self.poll()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Asks it to stop (SIGTERM), kills it after a grace period, and reaps it.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.poll()? {
            return Ok(s);
        }
        let _ = kill(self.pid(), Signal::SIGTERM);
        // The wrapper itself waits STOP_GRACE before killing its child: give it a little more.
        if let Some(s) = self.wait_until(Instant::now() + STOP_GRACE + Duration::from_secs(1))? {
            return Ok(s);
        }
        let _ = self.child.kill();
        let s = self.child.wait()?;
        self.status = Some(s);
        self.exited = Some(Instant::now());
        Ok(s)
    }

    /// Peak RSS in KiB, once a wrapped child has exited.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.rusage.as_ref()?).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// CPU seconds (user + system), once a wrapped child has exited.
    pub fn cpu_secs(&self) -> Option<f64> {
        let text = std::fs::read_to_string(self.rusage.as_ref()?).ok()?;
        let f: Vec<u64> = text
            .split_whitespace()
            .skip(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        (f.len() == 2).then(|| (f[0] + f[1]) as f64 / 1e6)
    }

    /// The last lines of its stderr, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }

    /// Fails with the log's tail if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.poll()? {
            None => Ok(()),
            Some(s) => bail!("{} exited ({s}): {}", self.name, self.log_tail(3)),
        }
    }

    /// Fails with the log's tail unless it exited with status 0.
    pub fn check_success(&mut self) -> Result<()> {
        match self.poll()? {
            Some(s) if s.success() => Ok(()),
            Some(s) => bail!("{} failed ({s}): {}", self.name, self.log_tail(3)),
            None => bail!("{} is still running", self.name),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Whether something listens on 127.0.0.1:`port`, from `/proc/net/tcp`. This never connects,
/// which matters for listeners that serve a single connection (socat).
pub fn listening(port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let want = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace();
        let local = f.nth(1);
        let state = f.nth(1);
        local == Some(want.as_str()) && state == Some("0A")
    })
}

/// Waits until `port` is listening, failing early if `server` exits.
pub fn wait_listening(server: &mut Proc, port: u16, deadline: Instant) -> Result<()> {
    loop {
        if listening(port) {
            return Ok(());
        }
        if let Some(s) = server.poll()? {
            bail!(
                "{} exited ({s}) before listening on port {port}: {}",
                server.name,
                server.log_tail(3)
            );
        }
        if Instant::now() >= deadline {
            bail!("{} does not listen on port {port}", server.name);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A loopback port that was free a moment ago (never 6379, where a shared server runs).
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        if port != 6379 {
            return Ok(port);
        }
    }
    bail!("no free port")
}
