//! Channel management: listing, inspecting and deleting channels.

use crate::channel::Channel;
use crate::client::{Conn, RelayConfig};
use crate::error::{Error, Result};
use crate::session;
use crate::writer::reader_positions;
use serde::Serialize;
use std::collections::HashMap;

/// A channel's state, as `tube ls` and `tube stat` show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The channel's name.
    pub channel: String,
    /// Whether a writer holds the channel now.
    pub writer_alive: bool,
    /// `reliable` or `live`: the mode of the latest session.
    pub mode: Option<String>,
    /// Number of the latest session (sessions are numbered from 1).
    pub sessions: u64,
    /// Bytes written in the latest session (as of the writer's last report, every 2 s).
    pub bytes_written: u64,
    /// Bytes of records the relay holds for the channel.
    pub bytes_held: u64,
    /// Bytes per second written over the writer's last report interval.
    pub rate: u64,
    /// Last time the writer reported, in milliseconds since the Unix epoch.
    pub last_activity_ms: Option<u64>,
    /// Milliseconds until the channel expires unless something writes to it.
    pub expires_in_ms: Option<u64>,
    /// Live readers.
    pub readers: Vec<ReaderInfo>,
}

/// A live reader of a channel.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReaderInfo {
    /// The reader's random ID.
    pub id: String,
    /// The session it reads.
    pub session: u64,
    /// Bytes of that session it has fetched.
    pub bytes: u64,
    /// Bytes it is behind the writer, when it reads the latest session.
    pub lag: Option<u64>,
}

/// The state of one channel.
///
/// # Errors
/// [`Error::NoSuchChannel`] when the relay holds nothing of it; connection errors.
pub async fn stat(relay: &RelayConfig, channel: &Channel) -> Result<ChannelInfo> {
    let mut conn = relay.connect().await?;
    info(&mut conn, channel)
        .await?
        .ok_or_else(|| Error::NoSuchChannel {
            channel: channel.name().into(),
        })
}

/// Every tube channel under `prefix` whose name matches the glob `pattern`, by name.
/// Uses SCAN, so a large relay is never blocked.
///
/// # Errors
/// Connection errors.
pub async fn list(relay: &RelayConfig, prefix: &str, pattern: &str) -> Result<Vec<ChannelInfo>> {
    let mut conn = relay.connect().await?;
    let mut cursor = 0u64;
    let mut names = Vec::new();
    let matching = Channel::meta_pattern(prefix, pattern);
    loop {
        let (next, keys): (u64, Vec<String>) = conn
            .query(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&matching)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("TYPE")
                    .arg("hash"),
            )
            .await?;
        names.extend(
            keys.iter()
                .filter_map(|k| Channel::name_from_meta_key(prefix, k))
                .map(str::to_owned),
        );
        if next == 0 {
            break;
        }
        cursor = next;
    }
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        // Names that tube would refuse (or keys that only look like tube's) are not listed.
        let Ok(channel) = Channel::new(&name, prefix) else {
            continue;
        };
        match info(&mut conn, &channel).await {
            Ok(Some(i)) => out.push(i),
            Ok(None) | Err(Error::ForeignKey { .. } | Error::NewerProtocol { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Deletes a channel and everything tube keeps of it.
///
/// # Errors
/// [`Error::HasWriter`] when a writer is alive and `force` is not set;
/// [`Error::NoSuchChannel`]; [`Error::ForeignKey`]; connection errors.
pub async fn remove(relay: &RelayConfig, channel: &Channel, force: bool) -> Result<()> {
    let mut conn = relay.connect().await?;
    let state = session::inspect(&mut conn, channel).await?;
    if state.lease.is_some() && !force {
        return Err(Error::HasWriter {
            channel: channel.name().into(),
        });
    }
    let readers: HashMap<String, String> = conn
        .query(redis::cmd("HGETALL").arg(channel.readers_key()))
        .await?;
    let mut del = redis::cmd("DEL");
    del.arg(channel.stream_key())
        .arg(channel.meta_key())
        .arg(channel.writer_key())
        .arg(channel.readers_key());
    for id in readers.keys() {
        del.arg(channel.reader_key(id));
    }
    let removed: u64 = conn.query(&del).await?;
    if removed == 0 {
        return Err(Error::NoSuchChannel {
            channel: channel.name().into(),
        });
    }
    Ok(())
}

async fn info(conn: &mut Conn, channel: &Channel) -> Result<Option<ChannelInfo>> {
    let state = session::inspect(conn, channel).await?;
    let mut pipe = redis::pipe();
    pipe.cmd("HGETALL").arg(channel.meta_key());
    pipe.cmd("PTTL").arg(channel.meta_key());
    // Values are bytes: the meta hash also keeps the binary begin record.
    let (meta, pttl): (HashMap<String, Vec<u8>>, i64) = conn.pipe(&pipe).await?;
    if meta.is_empty() {
        return Ok(None);
    }
    let text = |field: &str| meta.get(field).and_then(|v| std::str::from_utf8(v).ok());
    let num = |field: &str| text(field).and_then(|v| v.parse::<u64>().ok());
    let written = num("written").unwrap_or(0);
    let (_, positions) = reader_positions(conn, channel, false, &[]).await?;
    let mut readers: Vec<ReaderInfo> = positions
        .into_iter()
        .map(|(id, p)| ReaderInfo {
            id,
            session: p.session,
            bytes: p.offset,
            lag: (p.session == state.latest_session).then(|| written.saturating_sub(p.offset)),
        })
        .collect();
    readers.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Some(ChannelInfo {
        channel: channel.name().into(),
        writer_alive: state.lease.is_some(),
        mode: text("mode").map(str::to_owned),
        sessions: state.latest_session,
        bytes_written: written,
        bytes_held: num("held").unwrap_or(0),
        rate: num("rate").unwrap_or(0),
        last_activity_ms: num("active"),
        expires_in_ms: u64::try_from(pttl).ok(),
        readers,
    }))
}
