//! `tube relay`: a built-in relay that speaks the Redis protocol for the commands tube uses.
//!
//! (Placeholder: the server is being written.)

use std::future::Future;
use tokio::net::TcpListener;

/// How the relay runs.
#[derive(Debug, Clone, Default)]
pub struct RelayOptions {
    /// Password clients must give with AUTH or HELLO; `None` allows everyone.
    pub password: Option<String>,
    /// Bytes of data the relay may hold; writes beyond it fail with an OOM error.
    pub max_memory: usize,
}

/// A default memory bound: a quarter of the machine's memory, at most 1 GiB.
pub fn default_max_memory() -> usize {
    256 * 1024 * 1024
}

/// Serves clients on `listener` until `shutdown` completes.
///
/// # Errors
/// Accept errors that are not per-connection.
pub async fn serve(
    listener: TcpListener,
    opts: RelayOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let _ = (listener, opts);
    shutdown.await;
    Ok(())
}
