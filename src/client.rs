//! Connections to the relay: address handling, the handshake, and error mapping.
//!
//! Everything that talks to the relay goes through [`Conn`], so that every failure is mapped
//! to one [`Error`] that names the relay by its address, never by its URL (which may hold a
//! password).

use crate::error::{Error, Result};
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    RedisError, Value,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default relay URL: a relay on this machine's standard Redis port.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// How long connecting and the first answer may take before the relay counts as unreachable.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an ordinary command may wait for its answer. A relay that stays silent longer
/// counts as lost, and the connection is replaced.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// A relay whose round trip takes at least this long is distant: the writer keeps more in
/// flight to it, and its readers read ahead.
pub(crate) const DISTANT: Duration = Duration::from_millis(2);

/// How long writers and readers keep trying to get a lost relay back, by default.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(60);
/// First pause between reconnection attempts; it doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Where the relay is and how to log in to it.
#[derive(Clone)]
pub struct RelayConfig {
    info: ConnectionInfo,
    addr: Arc<str>,
    tls: Option<TlsOptions>,
    retry_for: Duration,
    /// Shared by every connection made from this configuration, so that one outage is
    /// announced once, however many connections it breaks.
    outage: Arc<Outage>,
}

/// TLS settings for `rediss://` relays.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM certificates to trust instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, for relays that require one.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Accept any server certificate. Anyone on the path can then read and alter the
    /// connection; only end-to-end encryption still protects the data.
    pub insecure: bool,
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Deliberately omits the credentials.
        f.debug_struct("RelayConfig")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RelayConfig {
    /// Parses a relay URL: `redis://[user[:password]@]host[:port][/db]`,
    /// `unix:///path/to/socket` or `redis+unix:///path/to/socket`.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`], which shows the URL with its password replaced by `***`.
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = || Error::InvalidUrl {
            url: redact_url(url),
        };
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://")
            || url.starts_with("redis+unix://"))
        {
            return Err(invalid());
        }
        let info = url.into_connection_info().map_err(|_| invalid())?;
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let addr = match info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                if host.is_empty() {
                    return Err(invalid());
                }
                if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }
            }
            ConnectionAddr::Unix(path) => path.display().to_string(),
            _ => return Err(invalid()),
        };
        let redis = info.redis_settings().clone().set_skip_set_lib_name();
        // Small records must leave at once: no Nagle delay behind an unacknowledged segment.
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        Ok(Self {
            info: info.set_redis_settings(redis).set_tcp_settings(tcp),
            addr: addr.into(),
            tls: tls.then(TlsOptions::default),
            retry_for: DEFAULT_RETRY_FOR,
            outage: Arc::default(),
        })
    }

    /// How long a writer or reader that lost the relay keeps reconnecting before it gives
    /// up; zero gives up at the first failure. Connecting at the start is never retried: a
    /// relay that is not there at all should be reported at once.
    pub fn with_retry_for(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    /// See [`RelayConfig::with_retry_for`].
    pub fn retry_for(&self) -> Duration {
        self.retry_for
    }

    /// Sets the TLS options of a `rediss://` relay.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when the URL is not `rediss://`.
    pub fn with_tls(mut self, options: TlsOptions) -> Result<Self> {
        let ConnectionAddr::TcpTls { host, port, .. } = self.info.addr().clone() else {
            return Err(Error::InvalidUrl {
                url: format!("for {}: TLS options need a rediss:// URL", self.addr),
            });
        };
        if options.insecure {
            self.info = self.info.set_addr(ConnectionAddr::TcpTls {
                host,
                port,
                insecure: true,
                tls_params: None,
            });
        }
        self.tls = Some(options);
        Ok(self)
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Uses `password` instead of any password in the URL.
    ///
    /// A password is a secret: it is never part of any message or `Debug` output.
    pub fn with_password(mut self, password: &str) -> Self {
        let redis = self.info.redis_settings().clone().set_password(password);
        self.info = self.info.set_redis_settings(redis);
        self
    }

    /// The relay's address for messages: `host:port` or a socket path, never credentials.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub(crate) fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    pub(crate) fn tls_options(&self) -> Option<&TlsOptions> {
        self.tls.as_ref()
    }

    /// Calls `open` after `failure` until it works, with growing pauses, for up to
    /// `retry_for` since the relay was lost; says so once per outage.
    ///
    /// # Errors
    /// [`Error::GaveUp`] after `retry_for`; at once, errors that another attempt cannot mend
    /// (a refused password, a TLS failure); `failure` itself when `retry_for` is zero.
    pub(crate) async fn reopen<T, F, Fut>(&self, failure: Error, mut open: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        if self.retry_for.is_zero() {
            return Err(failure);
        }
        let since = self.outage.begin(&self.addr, self.retry_for, &failure);
        let mut pause = FIRST_RETRY_PAUSE;
        loop {
            let last = match open().await {
                Ok(opened) => {
                    self.outage.end(&self.addr, true);
                    return Ok(opened);
                }
                Err(e @ (Error::Auth { .. } | Error::Tls { .. })) => {
                    self.outage.end(&self.addr, false);
                    return Err(e);
                }
                Err(e) => e,
            };
            let left = (since + self.retry_for).saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.outage.end(&self.addr, false);
                return Err(Error::GaveUp {
                    addr: self.addr.to_string(),
                    secs: self.retry_for.as_secs_f64(),
                    last: last.to_string(),
                });
            }
            tracing::debug!("reconnecting to {}: {last}", self.addr);
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }

    /// Opens a connection and checks that a Redis-protocol server answers on it. Failures are
    /// reported at once; see [`Conn::resilient`] for a connection that comes back.
    pub(crate) async fn connect(&self) -> Result<Conn> {
        let inner = self.open().await?;
        Ok(Conn {
            inner: inner.clone(),
            generation: 0,
            link: Arc::new(Link {
                relay: self.clone(),
                current: Mutex::new((inner, 0)),
                reconnecting: tokio::sync::Mutex::new(None),
            }),
            resilient: false,
        })
    }

    async fn open(&self) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            // tube sets its own deadlines per command: a blocking read must be able to wait.
            .set_response_timeout(None)
            .set_pipeline_buffer_size(PIPELINE_BUFFER);
        if self.tls.is_some() {
            install_crypto_provider();
        }
        let client = match &self.tls {
            None => redis::Client::open(self.info.clone()),
            Some(tls) => redis::Client::build_with_tls(
                self.info.clone(),
                redis::TlsCertificates {
                    client_tls: tls
                        .client_pem
                        .as_ref()
                        .map(|(cert, key)| redis::ClientTlsConfig {
                            client_cert: cert.clone(),
                            client_key: key.clone(),
                        }),
                    root_cert: tls.ca_pem.clone(),
                },
            ),
        }
        .map_err(|e| Error::Tls {
            addr: self.addr.to_string(),
            reason: error_text(&e),
        })?;
        let connecting = client.get_multiplexed_async_connection_with_config(&config);
        let inner = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.connect_error(&e)),
            Err(_) => {
                return Err(Error::Unreachable {
                    addr: self.addr.to_string(),
                    reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                });
            }
        };
        let mut conn = inner;
        let ping = redis::cmd("PING");
        match tokio::time::timeout(CONNECT_TIMEOUT, conn.send_packed_command(&ping)).await {
            Ok(Ok(Value::SimpleString(s))) if s == "PONG" => {}
            // A relay that wants a password and got none says so in its answer to PING.
            Ok(Ok(Value::ServerError(e))) if matches!(e.code(), "NOAUTH" | "NOPERM") => {
                return Err(Error::Auth {
                    addr: self.addr.to_string(),
                    reason: format!(
                        "{} (give the password in TUBE_PASSWORD, --password-file or the URL)",
                        e.details().unwrap_or(e.code()).trim_end_matches('.')
                    ),
                });
            }
            Ok(Ok(other)) => {
                return Err(Error::NotRedis {
                    addr: self.addr.to_string(),
                    reason: format!("PING was answered with {}", describe(&other)),
                });
            }
            Ok(Err(e)) => return Err(self.connect_error(&e)),
            Err(_) => {
                return Err(Error::NotRedis {
                    addr: self.addr.to_string(),
                    reason: format!("no answer to PING within {} s", CONNECT_TIMEOUT.as_secs()),
                });
            }
        }
        conn.set_response_timeout(COMMAND_TIMEOUT);
        Ok(conn)
    }

    fn connect_error(&self, e: &RedisError) -> Error {
        let addr = self.addr.to_string();
        let reason = error_text(e);
        if is_auth_error(e) {
            Error::Auth { addr, reason }
        } else if self.tls.is_some() && is_tls_error(e) {
            let reason = if reason.contains("CertificateRequired") {
                format!(
                    "{reason} (the relay requires a client certificate: give --tls-cert and --tls-key)"
                )
            } else {
                reason
            };
            Error::Tls { addr, reason }
        } else if self.tls.is_some() && e.is_connection_dropped() {
            // With TLS 1.3 a refused client certificate shows up only as a closed connection.
            Error::Tls {
                addr,
                reason: "the relay closed the connection after the handshake (does it require \
                         a client certificate? give --tls-cert and --tls-key)"
                    .into(),
            }
        } else if e.is_connection_refusal() {
            Error::Unreachable {
                addr,
                reason: "connection refused (is the relay running?)".into(),
            }
        } else if e.is_connection_dropped() {
            Error::NotRedis {
                addr,
                reason: "the connection was closed without a Redis answer".into(),
            }
        } else if e.is_io_error() || e.is_timeout() {
            Error::Unreachable { addr, reason }
        } else if matches!(
            e.kind(),
            redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
        ) {
            Error::NotRedis { addr, reason }
        } else {
            Error::Relay { addr, reason }
        }
    }
}

/// Room in the connection's request queue. Larger than any number of requests tube keeps in
/// flight, so that queuing a request never waits, which keeps requests in issue order.
pub(crate) const PIPELINE_BUFFER: usize = 1024;

/// The error codes with which a relay refuses a connection's credentials.
pub(crate) const AUTH_REFUSALS: [&str; 3] = ["WRONGPASS", "NOAUTH", "NOPERM"];

fn is_auth_error(e: &RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
        || e.code().is_some_and(|code| AUTH_REFUSALS.contains(&code))
        || e.to_string().contains("invalid password")
}

/// Chooses rustls's cryptography (ring) for the whole process, once.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only if a provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn is_tls_error(e: &RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer", "alert"]
        .iter()
        .any(|w| text.contains(w))
}

fn error_text(e: &RedisError) -> String {
    let text = e.to_string();
    // The client library's messages sometimes repeat the kind; keep one line.
    text.lines().next().unwrap_or_default().to_string()
}

fn describe(v: &Value) -> String {
    match v {
        Value::SimpleString(s) => format!("{:?}", truncate(s)),
        Value::BulkString(b) => format!("{:?}", truncate(&String::from_utf8_lossy(b))),
        other => format!("{:?}", other).chars().take(60).collect(),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Replaces the password of a URL, if any, with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.contains('@') {
            "***".into()
        } else {
            url.into()
        };
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            let shown = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                // A lone userinfo is the password in redis:// URLs.
                "***".into()
            };
            format!("{scheme}://{shown}@{}{path}", &authority[at + 1..])
        }
        None => url.into(),
    }
}

/// A connection to the relay that maps every failure to [`Error`].
///
/// Clones share one connection. A resilient connection ([`Conn::resilient`]) replaces a
/// connection that failed and sends the command again, so it must only carry commands that
/// may be repeated; the writer's appends are repeatable because each names its stream ID.
#[derive(Clone)]
pub(crate) struct Conn {
    inner: MultiplexedConnection,
    /// Which of the link's connections `inner` is.
    generation: u64,
    link: Arc<Link>,
    resilient: bool,
}

/// The connection that the clones of a [`Conn`] share, replaced when it fails.
struct Link {
    relay: RelayConfig,
    current: Mutex<(MultiplexedConnection, u64)>,
    /// Held while a new connection is being made, so that only one is. Holds the final
    /// error once reconnecting was given up: the other clones then give up at once too.
    reconnecting: tokio::sync::Mutex<Option<Error>>,
}

/// Whether a failure is the connection's (worth reconnecting), not the command's.
pub(crate) fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.code() == Some("LOADING")
}

impl Conn {
    /// A clone that reconnects and repeats its commands when the connection fails, for up
    /// to the configuration's `retry_for`.
    pub(crate) fn resilient(&self) -> Self {
        let mut c = self.clone();
        c.resilient = true;
        c
    }

    /// A clone that reports failures at once: for best-effort commands at the end, which
    /// must not hold up an exit.
    pub(crate) fn fragile(&self) -> Self {
        let mut c = self.clone();
        c.resilient = false;
        c
    }

    /// Picks up the connection another clone made after a failure.
    fn refresh(&mut self) {
        let current = self.link.current.lock().expect("not poisoned");
        if current.1 != self.generation {
            self.inner = current.0.clone();
            self.generation = current.1;
        }
    }

    /// A number that changes each time the connection is replaced.
    pub(crate) fn generation(&mut self) -> u64 {
        self.refresh();
        self.generation
    }

    /// Sends one command and converts its answer.
    pub(crate) async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T> {
        loop {
            self.refresh();
            match self.inner.send_packed_command(cmd).await {
                Ok(value) => {
                    return T::from_redis_value(value).map_err(|e| self.error(&e.into()));
                }
                Err(e) if self.resilient && is_connection_failure(&e) => {
                    let failure = self.error(&e);
                    self.reconnect(failure).await?;
                }
                Err(e) => return Err(self.error(&e)),
            }
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.link.relay.addr
    }

    /// The relay this connection goes to, for opening another.
    pub(crate) fn relay(&self) -> &RelayConfig {
        &self.link.relay
    }

    /// Maps a client-library error.
    pub(crate) fn error(&self, e: &RedisError) -> Error {
        let addr = self.addr().to_string();
        let reason = error_text(e);
        if is_auth_error(e) {
            Error::Auth { addr, reason }
        } else if is_connection_failure(e) {
            Error::Connection { addr, reason }
        } else {
            Error::Relay { addr, reason }
        }
    }

    /// Replaces the connection after `failure`, as [`RelayConfig::reopen`] says. One clone
    /// reconnects for all; once one gave up, the others give up at once too.
    ///
    /// # Errors
    /// As [`RelayConfig::reopen`].
    pub(crate) async fn reconnect(&mut self, failure: Error) -> Result<()> {
        let link = self.link.clone();
        let relay = &link.relay;
        let mut given_up = link.reconnecting.lock().await;
        if let Some(Error::GaveUp { addr, secs, last }) = &*given_up {
            return Err(Error::GaveUp {
                addr: addr.clone(),
                secs: *secs,
                last: last.clone(),
            });
        }
        if link.current.lock().expect("not poisoned").1 != self.generation {
            // Another clone has already replaced the connection this one failed on.
            self.refresh();
            return Ok(());
        }
        match relay.reopen(failure, || relay.open()).await {
            Ok(inner) => {
                let mut current = link.current.lock().expect("not poisoned");
                current.1 += 1;
                current.0 = inner;
                drop(current);
                self.refresh();
                Ok(())
            }
            Err(Error::GaveUp { addr, secs, last }) => {
                *given_up = Some(Error::GaveUp {
                    addr: addr.clone(),
                    secs,
                    last: last.clone(),
                });
                Err(Error::GaveUp { addr, secs, last })
            }
            Err(e) => Err(e),
        }
    }

    /// Puts the commands of `pipe` on the connection now and does not wait for their
    /// answers: for reports of which only the latest counts. They go out in the order of these
    /// calls (the request queue has room to spare, see [`PIPELINE_BUFFER`]), so an older
    /// report never lands after a newer one. Best effort: on a failed connection they are lost.
    pub(crate) fn send_unanswered(&mut self, pipe: &redis::Pipeline) {
        self.refresh();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for cmd in pipe.cmd_iter() {
            let mut cmd = cmd.clone();
            // The connection then reads the answer and drops it; the request is done once
            // it is queued, which its first poll does. Unconstrained: a task that used up its
            // scheduling budget would be told to wait, and the request would not be queued.
            cmd.set_no_response(true);
            let mut inner = self.inner.clone();
            let request = async move { inner.send_packed_command(&cmd).await };
            let mut request = std::pin::pin!(tokio::task::unconstrained(request));
            if let std::task::Poll::Ready(Err(e)) = request.as_mut().poll(&mut cx) {
                tracing::debug!("a report was not sent: {}", error_text(&e));
            }
        }
    }

    /// Sends a pipeline with its own deadline (for one that holds a blocking read).
    pub(crate) async fn pipe_unbounded<T: FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
        deadline: Duration,
    ) -> Result<T> {
        self.send_pipe(pipe, Some(deadline)).await
    }

    /// Sends a pipeline of commands and converts the answers.
    pub(crate) async fn pipe<T: FromRedisValue>(&mut self, pipe: &redis::Pipeline) -> Result<T> {
        self.send_pipe(pipe, None).await
    }

    async fn send_pipe<T: FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
        deadline: Option<Duration>,
    ) -> Result<T> {
        loop {
            self.refresh();
            let mut inner = self.inner.clone();
            if let Some(deadline) = deadline {
                inner.set_response_timeout(deadline);
            }
            match pipe.query_async(&mut inner).await {
                Ok(v) => return Ok(v),
                Err(e) if self.resilient && is_connection_failure(&e) => {
                    let failure = self.error(&e);
                    self.reconnect(failure).await?;
                }
                Err(e) => return Err(self.error(&e)),
            }
        }
    }
}

/// Whether the relay is lost, and since when: shared by the connections of one
/// configuration so that an outage is announced once and has one deadline.
#[derive(Debug, Default)]
struct Outage {
    /// Connections reconnecting now, and when the first of them lost the relay.
    state: Mutex<(usize, Option<Instant>)>,
}

impl Outage {
    /// One more connection is reconnecting; returns when the relay was lost.
    fn begin(&self, addr: &str, retry_for: Duration, failure: &Error) -> Instant {
        let mut state = self.state.lock().expect("not poisoned");
        state.0 += 1;
        *state.1.get_or_insert_with(|| {
            tracing::warn!(
                "lost the relay at {addr} ({}); reconnecting for up to {} s",
                failure.reason(),
                retry_for.as_secs_f64()
            );
            Instant::now()
        })
    }

    /// A connection stopped reconnecting, having got the relay back or given up.
    fn end(&self, addr: &str, back: bool) {
        let mut state = self.state.lock().expect("not poisoned");
        state.0 = state.0.saturating_sub(1);
        if state.0 == 0
            && let Some(since) = state.1.take()
            && back
        {
            tracing::warn!(
                "reconnected to the relay at {addr} after {:.1} s",
                since.elapsed().as_secs_f64()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://user:secret@host:1/0"),
            "redis://user:***@host:1/0"
        );
        assert_eq!(redact_url("redis://:secret@host"), "redis://:***@host");
        assert_eq!(redact_url("redis://secret@host"), "redis://***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_url("garbage:pw@x"), "***");
    }

    #[test]
    fn invalid_urls_never_show_the_password() {
        let err = RelayConfig::from_url("http://user:hunter2@host").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = RelayConfig::from_url("redis://user:hunter2@host:notaport").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn addresses_are_shown_without_credentials() {
        let c = RelayConfig::from_url("redis://u:pw@example.org:7000/2").unwrap();
        assert_eq!(c.addr(), "example.org:7000");
        assert!(!format!("{c:?}").contains("pw"));
        let c = RelayConfig::from_url("unix:///tmp/r.sock").unwrap();
        assert_eq!(c.addr(), "/tmp/r.sock");
        let c = RelayConfig::from_url("rediss://u:pw@relay.example:6380").unwrap();
        assert_eq!(c.addr(), "relay.example:6380");
        assert!(c.is_tls());
        assert!(
            RelayConfig::from_url("redis://h")
                .unwrap()
                .with_tls(TlsOptions::default())
                .is_err()
        );
    }
}
