//! The writer's data connection: commands framed by tube and written straight to the socket.
//!
//! A general Redis client copies each command into its own buffers and keeps that copy until
//! the answer arrives. For appends that is the whole window of data in flight, twice over,
//! plus a copy per record on the way out. Here a request is a small header and the record's
//! payload as it came from stdin (shared, not copied); the writer keeps it until the answer,
//! in case it must be sent again on a new connection, and nothing else holds it. That is what
//! lets a writer keep tens of megabytes in flight to a distant relay in little more memory
//! than the data itself.
//!
//! The writer's appends and trims use this connection, and so does a reader that follows a
//! distant relay ([`Link::waiting`]): its blocking reads must reach the relay in order, and its
//! records arrive without a copy. Everything else goes through [`crate::client::Conn`].
//! Answers are read in request order (RESP2; no `HELLO` is sent).

use crate::client::{AUTH_REFUSALS, COMMAND_TIMEOUT, CONNECT_TIMEOUT, RelayConfig};
use crate::error::{Error, Result};
use bytes::{BufMut, Bytes, BytesMut};
use redis::ConnectionAddr;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{self, IoSlice};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Stream for T {}

/// One command as it goes on the wire: `head`, then `body` and a line end when there is a
/// body. The body is the last argument's bulk data, kept apart so that it is never copied.
#[derive(Clone)]
pub(crate) struct Frame {
    head: Bytes,
    body: Bytes,
}

impl Frame {
    /// A command whose arguments are all in `args`.
    pub(crate) fn command(args: &[&[u8]]) -> Self {
        let mut head = BytesMut::new();
        put_array(&mut head, args.len());
        for arg in args {
            put_bulk(&mut head, arg);
        }
        Self {
            head: head.freeze(),
            body: Bytes::new(),
        }
    }

    /// A command already in wire form.
    pub(crate) fn packed(wire: Vec<u8>) -> Self {
        Self {
            head: Bytes::from(wire),
            body: Bytes::new(),
        }
    }

    /// A command whose last argument is `prefix` followed by `body`.
    pub(crate) fn with_body(args: &[&[u8]], prefix: &[u8], body: Bytes) -> Self {
        let mut head = BytesMut::with_capacity(64 + prefix.len());
        put_array(&mut head, args.len() + 1);
        for arg in args {
            put_bulk(&mut head, arg);
        }
        head.put_u8(b'$');
        put_decimal(&mut head, prefix.len() + body.len());
        head.put_slice(b"\r\n");
        head.put_slice(prefix);
        if body.is_empty() {
            head.put_slice(b"\r\n");
        }
        Self {
            head: head.freeze(),
            body,
        }
    }

    /// The bytes on the wire.
    fn len(&self) -> usize {
        self.head.len() + self.body.len() + if self.body.is_empty() { 0 } else { 2 }
    }
}

fn put_array(out: &mut BytesMut, n: usize) {
    out.put_u8(b'*');
    put_decimal(out, n);
    out.put_slice(b"\r\n");
}

fn put_bulk(out: &mut BytesMut, arg: &[u8]) {
    out.put_u8(b'$');
    put_decimal(out, arg.len());
    out.put_slice(b"\r\n");
    out.put_slice(arg);
    out.put_slice(b"\r\n");
}

fn put_decimal(out: &mut BytesMut, n: usize) {
    out.put_slice(n.to_string().as_bytes());
}

/// Answers of the writer's requests are IDs, counts and errors.
const SMALL_ANSWER: usize = 1024;
/// A deadline that never comes, in practice.
const FOREVER: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// The relay's answer to one request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    Bulk(Bytes),
    Int(i64),
    Simple(Bytes),
    /// An error reply, as the relay worded it.
    Refused(String),
    /// An array, as it came: the answer to a read.
    Array(Vec<BytesFrame>),
    /// Anything else (nil): never the answer to an append or a trim.
    Other(String),
}

/// A connection that carries requests framed by [`Frame`] and answers them in order.
pub(crate) struct Link {
    io: Box<dyn Stream>,
    addr: Arc<str>,
    rbuf: BytesMut,
    /// Requests sent and not yet answered.
    outstanding: usize,
    /// When the relay counts as lost if no answer has come.
    due: Instant,
    /// Why the connection is broken, once it is: every later answer is this failure.
    broken: Option<String>,
    /// Whether a relay that stays silent counts as lost; see [`Link::waiting`].
    impatient: bool,
    /// The largest answer expected, which sizes the reads from the socket.
    max_answer: usize,
}

impl Link {
    /// Connects and logs in as the configuration says (password, database).
    ///
    /// # Errors
    /// [`Error::Unreachable`] when no connection can be made in time; [`Error::Tls`] and
    /// [`Error::Auth`] as their names say.
    pub(crate) async fn open(relay: &RelayConfig) -> Result<Self> {
        let addr: Arc<str> = relay.addr().into();
        let unreachable = |reason: String| Error::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let io = match tokio::time::timeout(CONNECT_TIMEOUT, connect(relay)).await {
            Ok(io) => io?,
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let mut link = Self {
            io,
            addr: addr.clone(),
            rbuf: BytesMut::with_capacity(4096),
            outstanding: 0,
            due: Instant::now(),
            broken: None,
            impatient: true,
            max_answer: SMALL_ANSWER,
        };
        let settings = relay.info().redis_settings();
        let mut login = Vec::new();
        if let Some(password) = settings.password() {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = settings.username() {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            login.push(Frame::command(&args));
        }
        if settings.db() != 0 {
            let db = settings.db().to_string();
            login.push(Frame::command(&[b"SELECT", db.as_bytes()]));
        }
        for frame in &login {
            link.send(frame).await;
        }
        for _ in &login {
            match tokio::time::timeout(CONNECT_TIMEOUT, link.answer()).await {
                Ok(Ok(Answer::Simple(_))) => {}
                Ok(Ok(Answer::Refused(e))) if is_auth_refusal(&e) => {
                    return Err(Error::Auth {
                        addr: addr.to_string(),
                        reason: e,
                    });
                }
                Ok(Ok(other)) => {
                    return Err(Error::Relay {
                        addr: addr.to_string(),
                        reason: format!("logging in was answered with {other:?}"),
                    });
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(unreachable("no answer to logging in".into())),
            }
        }
        Ok(link)
    }

    /// For requests that wait on the relay for as long as it takes (blocking reads), and
    /// whose answers are up to `max_answer` bytes: the relay's silence is no failure (the
    /// caller checks on it by other means), and reads from the socket are sized so that an
    /// answer mostly lands whole in one buffer, which the records taken from it then share.
    pub(crate) fn waiting(mut self, max_answer: usize) -> Self {
        self.impatient = false;
        self.max_answer = max_answer.max(SMALL_ANSWER);
        self
    }

    /// Sends one request. A failure is not returned here but as the answer to this and every
    /// later request, so that the caller handles it in one place, in order.
    pub(crate) async fn send(&mut self, frame: &Frame) {
        self.send_requests(frame, 1).await;
    }

    /// Sends requests without bodies in one write, so that the relay takes them in one go.
    pub(crate) async fn send_all(&mut self, frames: &[Frame]) {
        let mut wire = BytesMut::new();
        for frame in frames {
            debug_assert!(frame.body.is_empty(), "only bodiless requests are joined");
            wire.put_slice(&frame.head);
        }
        let joined = Frame {
            head: wire.freeze(),
            body: Bytes::new(),
        };
        self.send_requests(&joined, frames.len()).await;
    }

    /// Sends `frame`, which holds `requests` requests.
    async fn send_requests(&mut self, frame: &Frame, requests: usize) {
        if self.broken.is_some() {
            self.outstanding += requests;
            return;
        }
        if self.outstanding == 0 {
            self.due = Instant::now() + COMMAND_TIMEOUT;
        }
        self.outstanding += requests;
        let written = tokio::time::timeout(COMMAND_TIMEOUT, write_frame(&mut self.io, frame)).await;
        let failure = match written {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("the relay took no data for {} s", COMMAND_TIMEOUT.as_secs()),
        };
        self.broken = Some(failure);
    }

    /// The answer to the oldest request not yet answered. Cancel-safe: a read cut short
    /// keeps what it read for the next call.
    ///
    /// # Errors
    /// [`Error::Connection`] when the connection failed or the relay stayed silent for
    /// [`COMMAND_TIMEOUT`]: the request may or may not have reached the relay.
    pub(crate) async fn answer(&mut self) -> Result<Answer> {
        loop {
            if let Some(reason) = &self.broken {
                return Err(self.failure(reason.clone()));
            }
            match decode_bytes_mut(&mut self.rbuf) {
                Ok(Some((frame, _, _))) => {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    self.due = Instant::now() + COMMAND_TIMEOUT;
                    return Ok(answer(frame));
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken = Some(format!("unreadable answer: {e}"));
                    continue;
                }
            }
            if self.rbuf.capacity() - self.rbuf.len() < self.max_answer {
                // A fresh buffer for several answers: the partial one is copied over, the
                // answers already taken keep the old buffer alive only as long as they live.
                self.rbuf.reserve(4 * self.max_answer);
            }
            let due = if self.impatient {
                self.due
            } else {
                Instant::now() + FOREVER
            };
            let read = tokio::time::timeout_at(due, self.io.read_buf(&mut self.rbuf)).await;
            let failure = match read {
                Ok(Ok(0)) => "the relay closed the connection".to_string(),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()),
            };
            self.broken = Some(failure);
        }
    }

    fn failure(&self, reason: String) -> Error {
        Error::Connection {
            addr: self.addr.to_string(),
            reason,
        }
    }
}

fn answer(frame: BytesFrame) -> Answer {
    match frame {
        BytesFrame::BulkString(b) => Answer::Bulk(b),
        BytesFrame::SimpleString(b) => Answer::Simple(b),
        BytesFrame::Integer(i) => Answer::Int(i),
        BytesFrame::Error(e) => Answer::Refused(e.to_string()),
        BytesFrame::Null => Answer::Other("nil".into()),
        BytesFrame::Array(a) => Answer::Array(a),
    }
}

fn is_auth_refusal(e: &str) -> bool {
    AUTH_REFUSALS
        .iter()
        .chain(&["ERR AUTH", "ERR invalid password"])
        .any(|code| e.starts_with(code))
}

/// Writes the frame whole, head and body in one system call where the socket takes them.
async fn write_frame(io: &mut Box<dyn Stream>, frame: &Frame) -> io::Result<()> {
    let tail: &[u8] = if frame.body.is_empty() { b"" } else { b"\r\n" };
    let parts = [&frame.head[..], &frame.body[..], tail];
    let mut done = 0;
    let total = frame.len();
    while done < total {
        let mut skip = done;
        let mut slices = Vec::with_capacity(3);
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            slices.push(IoSlice::new(&part[skip..]));
            skip = 0;
        }
        match io.write_vectored(&slices).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => done += n,
        }
    }
    io.flush().await
}

async fn connect(relay: &RelayConfig) -> Result<Box<dyn Stream>> {
    let addr = relay.addr().to_string();
    let io_error = |e: io::Error| Error::Unreachable {
        addr: addr.clone(),
        reason: e.to_string(),
    };
    match relay.info().addr() {
        ConnectionAddr::Tcp(host, port) => {
            let tcp = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(io_error)?;
            tcp.set_nodelay(true).map_err(io_error)?;
            Ok(Box::new(tcp))
        }
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            ..
        } => {
            let config = tls_config(relay, *insecure).map_err(|reason| Error::Tls {
                addr: addr.clone(),
                reason,
            })?;
            let name = ServerName::try_from(host.clone()).map_err(|e| Error::Tls {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
            let tcp = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(io_error)?;
            tcp.set_nodelay(true).map_err(io_error)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| Error::Tls {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            Ok(Box::new(tls))
        }
        ConnectionAddr::Unix(path) => {
            Ok(Box::new(UnixStream::connect(path).await.map_err(io_error)?))
        }
        other => Err(Error::InvalidUrl {
            url: format!("unsupported address {other:?}"),
        }),
    }
}

/// The same trust as the configuration's other connections: the given CA file or the
/// system's roots, the client certificate if any, or no checks at all when asked.
fn tls_config(
    relay: &RelayConfig,
    insecure: bool,
) -> std::result::Result<rustls::ClientConfig, String> {
    let options = relay.tls_options().cloned().unwrap_or_default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if insecure || options.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &options.ca_pem {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    roots
                        .add(cert.map_err(|e| e.to_string())?)
                        .map_err(|e| e.to_string())?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    // A system root rustls cannot use is no reason to fail.
                    let _ = roots.add(cert);
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    match &options.client_pem {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| e.to_string())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())
        }
    }
}

/// Accepts any certificate (`--tls-insecure`), though still checks that the handshake is
/// signed by the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wire(frame: &Frame) -> Vec<u8> {
        let mut out = frame.head.to_vec();
        if !frame.body.is_empty() {
            out.extend_from_slice(&frame.body);
            out.extend_from_slice(b"\r\n");
        }
        assert_eq!(out.len(), frame.len());
        out
    }

    proptest! {
        /// A frame is exactly what a general client would send for the same arguments.
        #[test]
        fn frames_match_the_clients_packing(
            args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..5),
            prefix in proptest::collection::vec(any::<u8>(), 0..40),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let mut cmd = redis::Cmd::new();
            for a in &args {
                cmd.arg(&a[..]);
            }
            prop_assert_eq!(wire(&Frame::command(&refs)), cmd.get_packed_command());
            let mut last = prefix.clone();
            last.extend_from_slice(&body);
            cmd.arg(&last[..]);
            let frame = Frame::with_body(&refs, &prefix, Bytes::from(body));
            prop_assert_eq!(wire(&frame), cmd.get_packed_command());
        }
    }

    #[test]
    fn answers_are_mapped_from_resp2() {
        let mut buf = BytesMut::from(
            &b"$3\r\n1-2\r\n:5\r\n-ERR no\r\n+OK\r\n$-1\r\n*2\r\n$1\r\nr\r\n:1\r\n"[..],
        );
        let mut got = Vec::new();
        while let Some((frame, _, _)) = decode_bytes_mut(&mut buf).expect("valid") {
            got.push(answer(frame));
        }
        assert_eq!(
            got,
            [
                Answer::Bulk(Bytes::from_static(b"1-2")),
                Answer::Int(5),
                Answer::Refused("ERR no".into()),
                Answer::Simple(Bytes::from_static(b"OK")),
                Answer::Other("nil".into()),
                Answer::Array(vec![
                    BytesFrame::BulkString(Bytes::from_static(b"r")),
                    BytesFrame::Integer(1)
                ]),
            ]
        );
    }
}
