//! What a channel looks like on the relay, and the checks every writer and reader makes
//! before touching it.

use crate::channel::Channel;
use crate::client::Conn;
use crate::error::{Error, Result};
use crate::record;
use redis::Value;

/// Protocol version stored in the channel's meta hash.
pub(crate) const META_PROTO: &str = "1";

/// A writer's lease value: its token as 32 lowercase hex digits.
pub(crate) fn lease_value(token: &[u8; 16]) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a value found in a writer key is one tube wrote.
pub(crate) fn is_lease_value(v: &[u8]) -> bool {
    v.len() == 32 && v.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// The channel's state as the relay holds it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChannelState {
    /// Latest session number, 0 when no session ever started.
    pub latest_session: u64,
    /// The live writer's lease value, if any.
    pub lease: Option<Vec<u8>>,
}

/// Reads the channel's keys and checks that each is absent or tube's.
///
/// # Errors
/// [`Error::ForeignKey`] when a key of the channel's name holds something tube did not
/// write; [`Error::NewerProtocol`] when a newer tube wrote the channel.
pub(crate) async fn inspect(conn: &mut Conn, ch: &Channel) -> Result<ChannelState> {
    let mut pipe = redis::pipe();
    inspection(&mut pipe, ch);
    let (ts, tm, tw, fields, lease): (Value, Value, Value, Value, Value) =
        conn.pipe(pipe.ignore_errors()).await?;
    inspected(conn, ch, [ts, tm, tw, fields, lease]).await
}

/// How many commands [`inspection`] adds.
pub(crate) const INSPECTION: usize = 5;

/// Adds to `pipe` the reads that [`inspected`] checks: the key types and the fields, in one
/// round trip, which a caller may share with its next commands. Where a type is wrong, its
/// read's answer is an error, looked at only after the clearer foreign-key check, so `pipe`
/// must ignore errors.
pub(crate) fn inspection(pipe: &mut redis::Pipeline, ch: &Channel) {
    let (stream, meta, writer) = (ch.stream_key(), ch.meta_key(), ch.writer_key());
    pipe.cmd("TYPE").arg(&stream);
    pipe.cmd("TYPE").arg(&meta);
    pipe.cmd("TYPE").arg(&writer);
    pipe.cmd("HMGET").arg(&meta).arg("proto").arg("session");
    pipe.cmd("GET").arg(&writer);
}

/// Checks the answers to [`inspection`] (see [`inspect`]).
pub(crate) async fn inspected(
    conn: &mut Conn,
    ch: &Channel,
    answers: [Value; INSPECTION],
) -> Result<ChannelState> {
    let (stream, meta, writer) = (ch.stream_key(), ch.meta_key(), ch.writer_key());
    let [ts, tm, tw, fields, lease] = answers;
    let shape = |e: redis::RedisError| conn.error(&e);
    // A refused TYPE (no permission, say) is reported as the relay worded it.
    let kind = |v: Value| -> Result<String> {
        redis::from_redis_value(v.extract_error().map_err(shape)?).map_err(|e| shape(e.into()))
    };
    let (ts, tm, tw) = (kind(ts)?, kind(tm)?, kind(tw)?);
    for (key, kind, want) in [
        (&stream, &ts, "stream"),
        (&meta, &tm, "hash"),
        (&writer, &tw, "string"),
    ] {
        if kind != "none" && kind != want {
            return Err(Error::ForeignKey {
                key: key.clone(),
                kind: kind.clone(),
            });
        }
    }
    let (proto, session): (Option<String>, Option<String>) =
        redis::from_redis_value(fields).map_err(|e| shape(e.into()))?;
    let lease: Option<Vec<u8>> = redis::from_redis_value(lease).map_err(|e| shape(e.into()))?;
    if tm == "hash" {
        match proto.as_deref() {
            Some(META_PROTO) => {}
            Some(v) if v.parse::<u64>().is_ok_and(|v| v > 1) => {
                return Err(Error::NewerProtocol {
                    channel: ch.name().into(),
                    version: v.into(),
                });
            }
            _ => {
                return Err(Error::ForeignKey {
                    key: meta,
                    kind: "hash without tube's fields".into(),
                });
            }
        }
    }
    if ts == "stream" && tm == "none" && !last_entry_is_tube_record(conn, &stream).await? {
        // No meta hash: the stream may be someone else's. (tube's own stream outlives a
        // lost meta hash; its newest entry then is a tube record.)
        return Err(Error::ForeignKey {
            key: stream,
            kind: "stream whose entries are not tube records".into(),
        });
    }
    if lease.as_deref().is_some_and(|v| !is_lease_value(v)) {
        return Err(Error::ForeignKey {
            key: writer,
            kind: "string that is not a tube lease".into(),
        });
    }
    let latest_session = match session {
        None => 0,
        Some(s) => s.parse().map_err(|_| Error::ForeignKey {
            key: ch.meta_key(),
            kind: "hash with a malformed session field".into(),
        })?,
    };
    Ok(ChannelState {
        latest_session,
        lease,
    })
}

/// Whether the newest entry of `stream` looks like tube's: one field `r` holding a record
/// whose header names the entry's own ID. An empty stream passes.
async fn last_entry_is_tube_record(conn: &mut Conn, stream: &str) -> Result<bool> {
    let newest: Value = conn
        .query(
            redis::cmd("XREVRANGE")
                .arg(stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    let Value::Array(entries) = newest else {
        return Ok(false);
    };
    let Some(Value::Array(entry)) = entries.first() else {
        return Ok(entries.is_empty());
    };
    let (Some(Value::BulkString(id)), Some(Value::Array(fields))) = (entry.first(), entry.get(1))
    else {
        return Ok(false);
    };
    let (Some((session, seq)), [Value::BulkString(field), Value::BulkString(value)]) =
        (record::parse_entry_id(id), fields.as_slice())
    else {
        return Ok(false);
    };
    Ok(field.as_slice() == record::FIELD.as_bytes()
        && value.len() >= record::HEADER_LEN
        && value[4..12] == session.to_be_bytes()
        && value[12..20] == seq.to_be_bytes())
}

/// The ID of the first entry at or after `from` (or, `reverse`, at or before it).
pub(crate) async fn first_entry(
    conn: &mut Conn,
    channel: &Channel,
    from: &str,
    reverse: bool,
) -> Result<Option<(u64, u64)>> {
    let mut cmd = redis::cmd(if reverse { "XREVRANGE" } else { "XRANGE" });
    cmd.arg(channel.stream_key());
    if reverse {
        cmd.arg(from).arg("-");
    } else {
        cmd.arg(from).arg("+");
    }
    cmd.arg("COUNT").arg(1);
    let entries: Vec<(String, Value)> = conn.query(&cmd).await?;
    Ok(entries
        .first()
        .and_then(|(id, _)| record::parse_entry_id(id.as_bytes())))
}

/// The ID of the newest entry of the channel's stream.
pub(crate) async fn newest_entry(conn: &mut Conn, channel: &Channel) -> Result<Option<(u64, u64)>> {
    first_entry(conn, channel, "+", true).await
}
