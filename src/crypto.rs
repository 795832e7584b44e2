//! End-to-end encryption: records sealed with a key the relay never sees.
//!
//! Each session derives its own record key from the shared secret with HKDF-SHA256, salted
//! with 32 random bytes from the writer and bound to the channel name, the session number and
//! every field of the session's begin record. Records are sealed with ChaCha20-Poly1305; the
//! nonce is the record's sequence number, unique within the session key, and the record's
//! header (kind, flags, session, sequence, offset) is the associated data. So a record cannot
//! be read, altered, moved to another place, session or channel, or replayed without the
//! reader noticing; the begin record carries a key check so that a wrong key, or an altered
//! begin record, fails before any data is written out.

use crate::error::Error;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
/// Bytes the AEAD adds to each sealed payload.
pub const TAG_LEN: usize = 16;
/// The only cipher of protocol version 1.
const CIPHER_CHACHA20_POLY1305: u8 = 1;
const KDF_RAW: u8 = 0;
const KDF_ARGON2ID: u8 = 1;
/// Argon2id cost for passphrases: 64 MiB, 3 passes, 1 lane (about a quarter second).
const ARGON2_M_KIB: u32 = 64 * 1024;
const ARGON2_T: u32 = 3;
const ARGON2_P: u32 = 1;
/// The most a reader spends on a passphrase, whatever a (possibly forged) header asks.
const ARGON2_MAX_M_KIB: u32 = 1024 * 1024;
const ARGON2_MAX_T: u32 = 16;
const ARGON2_MAX_P: u32 = 8;
const KEY_PREFIX: &str = "tube-key-1:";

/// The secret both ends share.
#[derive(Clone)]
pub enum Secret {
    /// A random key (`tube keygen`).
    Key(Zeroizing<[u8; KEY_LEN]>),
    /// A passphrase, stretched with Argon2id.
    Passphrase(Zeroizing<String>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Key(_) => "Secret::Key(..)",
            Self::Passphrase(_) => "Secret::Passphrase(..)",
        })
    }
}

impl Secret {
    /// A new random key, as text for a key file: `tube-key-1:` and 64 hex digits.
    pub fn generate_key_text() -> Zeroizing<String> {
        let key = Zeroizing::new(rand::random::<[u8; KEY_LEN]>());
        let mut text = Zeroizing::new(String::with_capacity(KEY_PREFIX.len() + 2 * KEY_LEN));
        text.push_str(KEY_PREFIX);
        for b in key.iter() {
            text.push_str(&format!("{b:02x}"));
        }
        text
    }

    /// Parses a key written by [`Secret::generate_key_text`] (surrounding white space is
    /// ignored).
    ///
    /// # Errors
    /// [`Error::BadKey`], which never repeats the text.
    pub fn parse_key(text: &str) -> Result<Self, Error> {
        let hex = text.trim();
        let hex = hex.strip_prefix(KEY_PREFIX).unwrap_or(hex);
        if hex.len() != 2 * KEY_LEN || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::BadKey(
                "expected tube-key-1: and 64 hex digits, as `tube keygen` prints".into(),
            ));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(Self::Key(key))
    }

    /// A passphrase secret.
    ///
    /// # Errors
    /// [`Error::BadKey`] for an empty passphrase.
    pub fn passphrase(text: &str) -> Result<Self, Error> {
        if text.is_empty() {
            return Err(Error::BadKey("the passphrase is empty".into()));
        }
        Ok(Self::Passphrase(Zeroizing::new(text.to_owned())))
    }
}

/// How the session key was made, as the begin record carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealParams {
    /// Random salt of the session key.
    pub salt: [u8; 32],
    /// Argon2id salt and cost, when the secret is a passphrase.
    pub argon2: Option<Argon2Params>,
    /// AEAD tag over nothing, proving the reader derived the same key from the same header.
    pub check: [u8; TAG_LEN],
}

/// Argon2id parameters of a passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Salt.
    pub salt: [u8; 16],
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl SealParams {
    /// The option value in a begin record.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.encode_without_check();
        v.extend_from_slice(&self.check);
        v
    }

    fn encode_without_check(&self) -> Vec<u8> {
        let mut v = vec![CIPHER_CHACHA20_POLY1305];
        v.extend_from_slice(&self.salt);
        match &self.argon2 {
            None => v.push(KDF_RAW),
            Some(a) => {
                v.push(KDF_ARGON2ID);
                v.extend_from_slice(&a.salt);
                v.extend_from_slice(&a.m_kib.to_be_bytes());
                v.extend_from_slice(&a.t.to_be_bytes());
                v.extend_from_slice(&a.p.to_be_bytes());
            }
        }
        v
    }

    /// Parses the option value; `None` if it is malformed or names an unknown cipher.
    pub fn decode(v: &[u8]) -> Option<Self> {
        let (&cipher, rest) = v.split_first()?;
        if cipher != CIPHER_CHACHA20_POLY1305 || rest.len() < 33 {
            return None;
        }
        let salt = rest[..32].try_into().ok()?;
        let (&kdf, rest) = rest[32..].split_first()?;
        let (argon2, rest) = match kdf {
            KDF_RAW => (None, rest),
            KDF_ARGON2ID if rest.len() >= 28 => {
                let u = |i: usize| u32::from_be_bytes(rest[i..i + 4].try_into().expect("4 bytes"));
                let a = Argon2Params {
                    salt: rest[..16].try_into().ok()?,
                    m_kib: u(16),
                    t: u(20),
                    p: u(24),
                };
                (Some(a), &rest[28..])
            }
            _ => return None,
        };
        Some(Self {
            salt,
            argon2,
            check: rest.try_into().ok()?,
        })
    }
}

/// The record key of one session.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::from(n)
}

/// The key check's nonce: no record uses it (sequence numbers stay far below 2^64 - 1).
fn check_nonce() -> Nonce {
    Nonce::from([0xff; 12])
}

const CHECK_AAD: &[u8] = b"tube/1 key check";

impl Sealer {
    /// The writer's side: new salts, the session key, and the parameters for the begin
    /// record. `context` is every other field of the begin record, already encoded, plus the
    /// channel name: all of it is bound into the key.
    ///
    /// Runs Argon2id for a passphrase: call it off the async threads.
    ///
    /// # Errors
    /// [`Error::BadKey`] if key derivation fails.
    pub fn create(secret: &Secret, context: &[u8]) -> Result<(Self, SealParams), Error> {
        let argon2 = matches!(secret, Secret::Passphrase(_)).then(|| Argon2Params {
            salt: rand::random(),
            m_kib: ARGON2_M_KIB,
            t: ARGON2_T,
            p: ARGON2_P,
        });
        let mut params = SealParams {
            salt: rand::random(),
            argon2,
            check: [0; TAG_LEN],
        };
        let sealer = Self::derive(secret, &params, context)?;
        params.check = sealer.check_tag();
        Ok((sealer, params))
    }

    /// The reader's side: derives the session key from the begin record and checks it.
    ///
    /// # Errors
    /// [`Error::WrongKey`] when the key check fails (wrong secret, or an altered begin
    /// record); [`Error::BadKey`] for absurd passphrase parameters.
    pub fn open_session(
        secret: &Secret,
        params: &SealParams,
        context: &[u8],
        channel: &str,
    ) -> Result<Self, Error> {
        if let Some(a) = &params.argon2
            && (a.m_kib > ARGON2_MAX_M_KIB || a.t > ARGON2_MAX_T || a.p > ARGON2_MAX_P)
        {
            return Err(Error::BadKey(format!(
                "the session asks for a passphrase cost beyond this reader's limit ({} KiB, {} passes, {} lanes)",
                a.m_kib, a.t, a.p
            )));
        }
        let sealer = Self::derive(secret, params, context)?;
        // Not a secret-dependent branch worth hiding: the check reveals only success.
        if sealer.check_tag() != params.check {
            return Err(Error::WrongKey {
                channel: channel.to_owned(),
            });
        }
        Ok(sealer)
    }

    fn derive(secret: &Secret, params: &SealParams, context: &[u8]) -> Result<Self, Error> {
        let mut master = Zeroizing::new([0u8; KEY_LEN]);
        match (secret, &params.argon2) {
            (Secret::Key(k), None) => master.copy_from_slice(&k[..]),
            (Secret::Passphrase(p), Some(a)) => {
                let cost = argon2::Params::new(a.m_kib, a.t, a.p, Some(KEY_LEN))
                    .map_err(|e| Error::BadKey(format!("passphrase parameters: {e}")))?;
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, cost)
                    .hash_password_into(p.as_bytes(), &a.salt, &mut master[..])
                    .map_err(|e| Error::BadKey(format!("passphrase: {e}")))?;
            }
            (Secret::Key(_), Some(_)) => {
                return Err(Error::BadKey(
                    "the session was sealed with a passphrase, but a key file was given".into(),
                ));
            }
            (Secret::Passphrase(_), None) => {
                return Err(Error::BadKey(
                    "the session was sealed with a key file, but a passphrase was given".into(),
                ));
            }
        }
        let mut info = b"tube/1 record key".to_vec();
        info.extend_from_slice(&params.encode_without_check());
        info.extend_from_slice(context);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        Hkdf::<Sha256>::new(Some(&params.salt), &master[..])
            .expand(&info, &mut key[..])
            .map_err(|_| Error::BadKey("key derivation failed".into()))?;
        let cipher = ChaCha20Poly1305::new_from_slice(&key[..])
            .map_err(|_| Error::BadKey("key derivation failed".into()))?;
        Ok(Self { cipher })
    }

    fn check_tag(&self) -> [u8; TAG_LEN] {
        let tag = self
            .cipher
            .encrypt(
                &check_nonce(),
                Payload {
                    msg: &[],
                    aad: CHECK_AAD,
                },
            )
            .expect("sealing nothing cannot fail");
        tag.try_into().expect("a tag is 16 bytes")
    }

    /// Seals a record's payload; `header` is the record's header, bound as associated data.
    pub fn seal(&self, seq: u64, header: &[u8], plaintext: &[u8]) -> Vec<u8> {
        self.cipher
            .encrypt(
                &nonce(seq),
                Payload {
                    msg: plaintext,
                    aad: header,
                },
            )
            .expect("records are far below the AEAD's length limit")
    }

    /// Opens a sealed payload; `None` if it was altered or belongs elsewhere.
    pub fn open(&self, seq: u64, header: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        self.cipher
            .decrypt(
                &nonce(seq),
                Payload {
                    msg: sealed,
                    aad: header,
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Secret {
        Secret::parse_key(&Secret::generate_key_text()).unwrap()
    }

    #[test]
    fn keys_round_trip_through_text_and_bad_text_is_refused_without_echo() {
        let text = Secret::generate_key_text();
        assert!(text.starts_with("tube-key-1:") && text.len() == 11 + 64);
        assert!(Secret::parse_key(&format!("  {}\n", *text)).is_ok());
        let err = Secret::parse_key("tube-key-1:secretsecret").unwrap_err();
        assert!(!err.to_string().contains("secretsecret"));
    }

    #[test]
    fn sealed_records_open_only_in_their_place() {
        let secret = key();
        let (writer, params) = Sealer::create(&secret, b"cam1|5").unwrap();
        let reader = Sealer::open_session(&secret, &params, b"cam1|5", "cam1").unwrap();
        let sealed = writer.seal(7, b"header-7", b"hello");
        assert_eq!(
            reader.open(7, b"header-7", &sealed).as_deref(),
            Some(&b"hello"[..])
        );
        assert!(
            reader.open(8, b"header-7", &sealed).is_none(),
            "another sequence"
        );
        assert!(
            reader.open(7, b"header-8", &sealed).is_none(),
            "another header"
        );
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert!(reader.open(7, b"header-7", &flipped).is_none(), "altered");
        // Another channel or session derives another key: the check fails.
        assert!(matches!(
            Sealer::open_session(&secret, &params, b"cam2|5", "cam2"),
            Err(Error::WrongKey { .. })
        ));
        assert!(matches!(
            Sealer::open_session(&key(), &params, b"cam1|5", "cam1"),
            Err(Error::WrongKey { .. })
        ));
    }

    #[test]
    fn passphrases_are_stretched_and_checked() {
        let secret = Secret::passphrase("correct horse").unwrap();
        let (writer, params) = Sealer::create(&secret, b"ctx").unwrap();
        let a = params.argon2.unwrap();
        assert_eq!((a.m_kib, a.t, a.p), (ARGON2_M_KIB, ARGON2_T, ARGON2_P));
        let reader = Sealer::open_session(&secret, &params, b"ctx", "c").unwrap();
        assert_eq!(
            reader.open(1, b"h", &writer.seal(1, b"h", b"x")).unwrap(),
            b"x"
        );
        let wrong = Secret::passphrase("wrong horse").unwrap();
        assert!(Sealer::open_session(&wrong, &params, b"ctx", "c").is_err());
        let mut greedy = params.clone();
        greedy.argon2 = Some(Argon2Params {
            m_kib: u32::MAX,
            ..a
        });
        assert!(matches!(
            Sealer::open_session(&secret, &greedy, b"ctx", "c"),
            Err(Error::BadKey(_))
        ));
    }

    #[test]
    fn params_round_trip() {
        let (_, params) = Sealer::create(&key(), b"x").unwrap();
        assert_eq!(SealParams::decode(&params.encode()), Some(params));
        assert_eq!(SealParams::decode(&[2; 60]), None);
        assert_eq!(SealParams::decode(&[]), None);
    }
}
