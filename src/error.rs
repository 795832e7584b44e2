//! tube's error type.

use crate::record::DecodeError;

/// Everything that can go wrong in tube, worded for the person at the terminal.
///
/// Messages never contain a password: relay addresses are shown as `host:port` or a socket
/// path, never as the URL the user gave.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The channel name cannot be used.
    #[error("invalid channel name \"{name}\": {reason}")]
    InvalidChannel {
        /// The name, escaped and shortened for display.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// The key prefix cannot be used.
    #[error("invalid key prefix \"{prefix}\": {reason}")]
    InvalidPrefix {
        /// The prefix, escaped for display.
        prefix: String,
        /// Why it was refused.
        reason: String,
    },
    /// The relay URL cannot be parsed.
    #[error(
        "invalid relay URL {url}: expected redis://[user[:password]@]host[:port][/db] or unix:///path/to/socket"
    )]
    InvalidUrl {
        /// The URL with any password replaced by `***`.
        url: String,
    },
    /// No connection to the relay could be made.
    #[error("cannot reach the relay at {addr}: {reason}")]
    Unreachable {
        /// Where tube tried to connect.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The relay refused the credentials.
    #[error("the relay at {addr} refused the credentials: {reason}")]
    Auth {
        /// The relay's address.
        addr: String,
        /// The relay's answer (it never includes the password).
        reason: String,
    },
    /// The TLS connection to the relay failed (certificate not trusted, client certificate
    /// refused, not a TLS server).
    #[error("TLS with the relay at {addr} failed: {reason}")]
    Tls {
        /// The relay's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// Something answered that is not a Redis-protocol server.
    #[error("{addr} does not answer like a Redis server: {reason}")]
    NotRedis {
        /// The address.
        addr: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// The connection failed after it was established.
    #[error("connection to the relay at {addr} failed: {reason}")]
    Connection {
        /// The relay's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The relay was lost mid-stream and did not come back within the retry time.
    #[error(
        "lost the relay at {addr} and could not reconnect within {secs} s (last attempt: {last})"
    )]
    GaveUp {
        /// The relay's address.
        addr: String,
        /// How long reconnecting was tried.
        secs: f64,
        /// Why the last attempt failed.
        last: String,
    },
    /// The relay answered a command with an error.
    #[error("the relay at {addr} answered with an error: {reason}")]
    Relay {
        /// The relay's address.
        addr: String,
        /// The relay's error message.
        reason: String,
    },
    /// A key that tube would use belongs to something else.
    #[error("key {key} exists and is not tube's (it holds a {kind}); tube will not touch it")]
    ForeignKey {
        /// The key.
        key: String,
        /// What the key holds.
        kind: String,
    },
    /// The channel was written by a newer, incompatible tube.
    #[error(
        "channel {channel} uses tube protocol {version}; this tube speaks protocol 1: upgrade tube"
    )]
    NewerProtocol {
        /// The channel.
        channel: String,
        /// The protocol version found on the relay.
        version: String,
    },
    /// Another writer holds the channel.
    #[error("channel {channel} already has a live writer; only one writer at a time")]
    Busy {
        /// The channel.
        channel: String,
    },
    /// The channel does not exist on the relay.
    #[error("no channel named {channel} on the relay")]
    NoSuchChannel {
        /// The channel.
        channel: String,
    },
    /// The channel cannot be deleted while its writer lives.
    #[error("channel {channel} has a live writer; use --force to delete it anyway")]
    HasWriter {
        /// The channel.
        channel: String,
    },
    /// The writer lost its lease (it was stalled longer than the lease lasts and another
    /// writer took the channel, or the key was deleted).
    #[error("lost the writer lease of channel {channel}: {reason}")]
    LeaseLost {
        /// The channel.
        channel: String,
        /// What was found instead.
        reason: String,
    },
    /// The session's writer disappeared without ending the session.
    #[error("writer of {channel} vanished after {bytes} bytes")]
    WriterVanished {
        /// The channel.
        channel: String,
        /// Bytes the reader received and wrote out.
        bytes: u64,
    },
    /// The session's writer was stopped by a signal before its input ended.
    #[error("writer of {channel} was interrupted after {bytes} bytes")]
    Interrupted {
        /// The channel.
        channel: String,
        /// Bytes in the session, all of which the reader wrote out.
        bytes: u64,
    },
    /// The records on the relay are not a valid stream: a gap, a reorder, a bad record, a
    /// length or digest mismatch.
    #[error("corrupt stream on channel {channel} at byte {offset}: {detail}")]
    Corrupt {
        /// The channel.
        channel: String,
        /// Bytes of the session written out before the problem.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The relay no longer holds data the reader had not read: the relay restarted without
    /// persistence, was flushed, the channel's keys were deleted, or the records were trimmed
    /// before this reader fetched them. Everything before `offset` was written out.
    #[error("data lost on channel {channel}: missing from byte {offset}: {detail}")]
    Lost {
        /// The channel.
        channel: String,
        /// Bytes of the session written out, all of them before the loss.
        offset: u64,
        /// What is missing, and why it may be.
        detail: String,
    },
    /// A record could not be decoded.
    #[error("bad record on channel {channel}: {source}")]
    Decode {
        /// The channel.
        channel: String,
        /// Why decoding failed.
        source: DecodeError,
    },
    /// A key or passphrase cannot be used.
    #[error("bad key: {0}")]
    BadKey(String),
    /// The session is encrypted and no key was given.
    #[error(
        "the session on channel {channel} is encrypted: give its key (--key-file or TUBE_KEY) or passphrase (--passphrase-file or TUBE_PASSPHRASE)"
    )]
    KeyRequired {
        /// The channel.
        channel: String,
    },
    /// The key check of an encrypted session failed.
    #[error("wrong key for channel {channel} (or its session header was altered on the relay)")]
    WrongKey {
        /// The channel.
        channel: String,
    },
    /// A key was given but the session is not encrypted: anyone with access to the relay
    /// could have written it.
    #[error(
        "the session on channel {channel} is not encrypted, but a key was given: refusing it, since anyone with access to the relay could have written it"
    )]
    NotEncrypted {
        /// The channel.
        channel: String,
    },
    /// The writer or reader was used after it failed or finished.
    #[error("the {0} is closed")]
    Closed(&'static str),
    /// Local I/O (stdin, stdout) failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether this error means the stream reached the reader incomplete or damaged, as
    /// opposed to tube failing to run at all.
    pub fn is_stream_fault(&self) -> bool {
        matches!(
            self,
            Self::WriterVanished { .. }
                | Self::Interrupted { .. }
                | Self::Corrupt { .. }
                | Self::Lost { .. }
                | Self::Decode { .. }
        )
    }

    /// The reason part of a relay error, without the address, for messages that name the
    /// relay themselves.
    pub(crate) fn reason(&self) -> String {
        match self {
            Self::Unreachable { reason, .. }
            | Self::Connection { reason, .. }
            | Self::NotRedis { reason, .. }
            | Self::Relay { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}

/// Shorthand for tube results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
