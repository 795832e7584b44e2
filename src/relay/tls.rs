//! TLS for the relay's listener: the server configuration from PEM files, and the handshake.
//!
//! The handshake runs in the connection's own task, under a deadline, so a client that opens
//! a connection and sends nothing (or a byte at a time) cannot hold it for long. A plaintext
//! Redis client that reaches the TLS port is told so in its own protocol before it is closed,
//! so that it prints an error a person can act on rather than a parse failure.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first byte of every TLS record that opens a handshake (content type 22).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a plaintext client on the TLS port is told before the connection closes.
/// Short: clients may show only the start of an unexpected answer.
const PLAINTEXT_REFUSAL: &[u8] = b"-ERR relay requires TLS: use rediss://\r\n";

/// How long a refused client's last bytes are drained, so that what it is sent is not lost.
const LINGER: Duration = Duration::from_secs(1);

/// The relay's TLS files, as PEM.
///
/// With `client_ca`, every client must present a certificate signed by one of the CAs in it;
/// others fail the handshake.
#[derive(Debug, Clone)]
pub struct RelayTls {
    /// The relay's certificate chain, its own certificate first.
    pub cert: PathBuf,
    /// The private key of the relay's certificate.
    pub key: PathBuf,
    /// CAs whose client certificates are accepted; `None` asks clients for none.
    pub client_ca: Option<PathBuf>,
}

impl RelayTls {
    /// Reads and checks the files and builds the server configuration (ring cryptography,
    /// TLS 1.2 and 1.3).
    ///
    /// # Errors
    /// One line naming the file: unreadable, no PEM certificate or key in it, or a key that
    /// does not belong to the certificate.
    pub fn server_config(&self) -> io::Result<Arc<rustls::ServerConfig>> {
        let certs = read_certs(&self.cert, "TLS certificate")?;
        let key_pem = read(&self.key, "TLS key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            invalid(format!(
                "the TLS key {} holds no usable private key: {}",
                self.key.display(),
                pem_error(&e)
            ))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS setup: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(path, "client CA file")? {
                    roots.add(cert).map_err(|e| {
                        invalid(format!("the client CA file {}: {e}", path.display()))
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| invalid(format!("the client CA file {}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            invalid(format!(
                "the TLS certificate {} and key {} do not go together: {e}",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        Ok(Arc::new(config))
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn read(path: &Path, what: &str) -> io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("reading the {what} {}: {e}", path.display()),
        )
    })
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path, what: &str) -> io::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("the {what} {}: {}", path.display(), pem_error(&e))))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "the {what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM section found".into(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// Why a connection never got past the handshake, for the debug log.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The client spoke plaintext to the TLS port.
    Plaintext,
    /// The client closed before sending anything.
    Closed,
    TimedOut,
    Shutdown,
    Handshake(io::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Plaintext => write!(f, "the client spoke plaintext to the TLS port"),
            Refused::Closed => write!(f, "the client closed before the handshake"),
            Refused::TimedOut => write!(
                f,
                "no TLS handshake within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ),
            Refused::Shutdown => write!(f, "relay shutting down"),
            Refused::Handshake(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

/// Completes the server side of the handshake within [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn accept(
    acceptor: &TlsAcceptor,
    mut sock: TcpStream,
    shutdown: &CancellationToken,
) -> Result<TlsStream<TcpStream>, Refused> {
    let handshake = async {
        // A TLS client speaks first, with a handshake record; a Redis client also speaks
        // first, with a command.
        let mut first = [0u8; 1];
        match sock.peek(&mut first).await {
            Ok(0) => return Err(Refused::Closed),
            Ok(_) => {}
            Err(e) => return Err(Refused::Handshake(e)),
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            if sock.write_all(PLAINTEXT_REFUSAL).await.is_ok() {
                linger(sock).await;
            }
            return Err(Refused::Plaintext);
        }
        match acceptor.accept(sock).into_fallible().await {
            Ok(stream) => Ok(stream),
            Err((e, sock)) => {
                // rustls has sent an alert that says why (no client certificate, say).
                linger(sock).await;
                Err(Refused::Handshake(e))
            }
        }
    };
    tokio::select! {
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => {
            done.unwrap_or(Err(Refused::TimedOut))
        }
        _ = shutdown.cancelled() => Err(Refused::Shutdown),
    }
}

/// Closes a refused connection so that what it was last sent arrives.
///
/// Closing a socket with unread input resets the connection, and a reset can overtake the
/// last bytes sent (a refusal, a TLS alert). So: end our side, then read what the client still
/// sends until it closes too, for a moment at most.
async fn linger(mut sock: TcpStream) {
    let _ = sock.shutdown().await;
    let drain = async {
        let mut scrap = [0u8; 1024];
        while let Ok(1..) = sock.read(&mut scrap).await {}
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, cert: &str, key: &str) -> RelayTls {
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        RelayTls {
            cert: c,
            key: k,
            client_ca: None,
        }
    }

    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_certificate_and_its_key_make_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let mut tls = files(dir.path(), &cert, &key);
        assert!(tls.server_config().is_ok());
        tls.client_ca = Some(tls.cert.clone());
        assert!(tls.server_config().is_ok());
    }

    #[test]
    fn bad_files_give_one_line_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let cases = [
            ("not a certificate", key.as_str(), "cert.pem"),
            (&cert, "not a key", "key.pem"),
            (&key, &key, "cert.pem"),
            (&cert, &other_key, "do not go together"),
        ];
        for (cert, key, expect) in cases {
            let e = files(dir.path(), cert, key)
                .server_config()
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let missing = RelayTls {
            cert: dir.path().join("missing.pem"),
            key: dir.path().join("key.pem"),
            client_ca: None,
        };
        let e = missing.server_config().unwrap_err().to_string();
        assert!(
            e.starts_with("reading the TLS certificate") && e.contains("missing.pem"),
            "{e}"
        );
        let mut bad_ca = files(dir.path(), &cert, &key);
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "nothing").unwrap();
        bad_ca.client_ca = Some(ca);
        let e = bad_ca.server_config().unwrap_err().to_string();
        assert!(e.contains("client CA file"), "{e}");
    }
}
