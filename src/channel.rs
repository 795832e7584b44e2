//! Channel names and the relay keys that belong to a channel.

use crate::error::Error;

/// Longest channel name accepted, in bytes.
///
/// Long enough for any path-like naming scheme, short enough that a key stays small in every
/// listing and log line.
pub const MAX_CHANNEL_LEN: usize = 200;

/// Default key prefix: every key tube writes starts with it.
pub const DEFAULT_PREFIX: &str = "tube:";

/// A validated channel name together with the key prefix it lives under.
///
/// All keys of a channel share the Redis Cluster hash tag `{name}`, so one channel never spans
/// cluster slots and multi-key commands on it stay legal on a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    name: String,
    prefix: String,
}

impl Channel {
    /// Checks `name` and `prefix` and builds the channel.
    ///
    /// # Errors
    /// [`Error::InvalidChannel`] when the name is empty, longer than [`MAX_CHANNEL_LEN`] bytes,
    /// or holds a control character or a brace (braces would break the hash tag);
    /// [`Error::InvalidPrefix`] when the prefix holds a brace or a control character.
    pub fn new(name: &str, prefix: &str) -> Result<Self, Error> {
        validate_name(name)?;
        if let Some(c) = prefix
            .chars()
            .find(|c| c.is_control() || *c == '{' || *c == '}')
        {
            return Err(Error::InvalidPrefix {
                prefix: prefix.escape_debug().to_string(),
                reason: format!("it contains {:?}", c),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    /// The channel's name as the user gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{{{}}}:{}", self.prefix, self.name, suffix)
    }

    /// The Redis stream that holds the channel's records.
    pub fn stream_key(&self) -> String {
        self.key("stream")
    }

    /// The hash that holds the channel's metadata (protocol version, latest session).
    pub fn meta_key(&self) -> String {
        self.key("meta")
    }

    /// The string whose presence is the live writer's lease.
    pub fn writer_key(&self) -> String {
        self.key("writer")
    }

    /// The hash of registered readers (reader ID -> start time).
    pub fn readers_key(&self) -> String {
        self.key("readers")
    }

    /// The string holding one reader's position; it expires when the reader stops renewing.
    pub fn reader_key(&self, id: &str) -> String {
        self.key(&format!("reader:{id}"))
    }

    /// The key pattern (for SCAN MATCH) of the meta hashes of channels whose names match
    /// the glob `pattern` under `prefix`.
    pub fn meta_pattern(prefix: &str, pattern: &str) -> String {
        format!("{}{{{}}}:meta", glob_escape(prefix), pattern)
    }

    /// The channel name inside a meta key, if `key` is one under `prefix`.
    pub fn name_from_meta_key<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(prefix)?
            .strip_prefix('{')?
            .strip_suffix("}:meta")
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

fn validate_name(name: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidChannel {
        // Shown escaped so that a name with a newline or escape sequence cannot forge output.
        name: truncate_for_display(name),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(invalid(format!(
            "it is {} bytes long, the limit is {MAX_CHANNEL_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(invalid(format!(
            "it contains the control character {:?}",
            c
        )));
    }
    if name.contains(['{', '}']) {
        return Err(invalid(
            "it contains a brace ('{' or '}'), which tube reserves for the key's hash tag".into(),
        ));
    }
    Ok(())
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn truncate_for_display(name: &str) -> String {
    const SHOWN: usize = 60;
    let escaped: String = name.escape_debug().take(SHOWN).collect();
    if name.chars().count() > SHOWN {
        format!("{escaped}…")
    } else {
        escaped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let c = Channel::new("cam1", DEFAULT_PREFIX).unwrap();
        assert_eq!(c.stream_key(), "tube:{cam1}:stream");
        assert_eq!(c.meta_key(), "tube:{cam1}:meta");
        assert_eq!(c.writer_key(), "tube:{cam1}:writer");
        assert_eq!(c.readers_key(), "tube:{cam1}:readers");
        assert_eq!(c.reader_key("ab"), "tube:{cam1}:reader:ab");
    }

    #[test]
    fn meta_keys_are_found_and_parsed() {
        assert_eq!(Channel::meta_pattern("t*:", "cam?"), "t\\*:{cam?}:meta");
        assert_eq!(
            Channel::name_from_meta_key("tube:", "tube:{a b}:meta"),
            Some("a b")
        );
        assert_eq!(
            Channel::name_from_meta_key("tube:", "tube:{a}:stream"),
            None
        );
        assert_eq!(Channel::name_from_meta_key("tube:", "other:{a}:meta"), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(Channel::new("", "tube:").is_err());
        assert!(Channel::new("a\nb", "tube:").is_err());
        assert!(Channel::new("a\0b", "tube:").is_err());
        assert!(Channel::new("a{b", "tube:").is_err());
        assert!(Channel::new(&"x".repeat(201), "tube:").is_err());
        assert!(Channel::new(&"x".repeat(200), "tube:").is_ok());
        assert!(Channel::new("home/cam 1:é", "tube:").is_ok());
        assert!(Channel::new("cam", "t{x}").is_err());
    }

    #[test]
    fn long_names_are_shortened_in_errors() {
        let err = Channel::new(&"x".repeat(1_000_000), "tube:").unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }
}
