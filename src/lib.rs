//! tube: a tube between two Unix pipes.
//!
//! Bytes written into a channel on one host come out of it on another, through a relay both
//! can reach: a Redis server (its Streams), any server that speaks its protocol, or tube's
//! own relay.
//!
//! # Layout
//! - [`channel`]: channel names and the relay keys of a channel.
//! - [`record`]: the on-relay record format (`docs/PROTOCOL.md`).
//! - [`crypto`]: end-to-end encryption of records.
//! - [`client`]: connecting to the relay; errors that never show a password.
//! - [`writer`]: [`Writer`], one session of a channel, pipelined appends, the writer's lease.
//! - [`reader`]: [`Reader`], batched reads, every record checked.
//! - [`relay`]: `tube relay`, the built-in Redis-protocol relay.
//! - [`admin`]: listing, inspecting and deleting channels.
//! - [`units`]: byte sizes as people write them.
//! - [`error`]: [`Error`], one type for everything that can go wrong.

pub mod admin;
pub mod channel;
pub mod client;
pub mod crypto;
pub mod error;
mod link;
pub mod reader;
pub mod record;
pub mod relay;
mod session;
pub mod units;
pub mod writer;

pub use channel::{Channel, DEFAULT_PREFIX};
pub use client::{DEFAULT_URL, RelayConfig, TlsOptions};
pub use crypto::Secret;
pub use error::{Error, Result};
pub use reader::{ReadOptions, Reader, ReaderProgress, StartAt};
pub use record::EndStatus;
pub use writer::{Summary, WriteOptions, Writer, WriterProgress};
