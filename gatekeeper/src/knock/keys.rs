//! Keys for knocks: every device has its own X25519 key pair, the gateway
//! has one static pair. Because both are static, each client's AEAD key is
//! fixed and the gateway derives it once per client, not once per knock.

use base64::{Engine, engine::general_purpose::STANDARD};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

/// Names the version in the key derivation, so a v1 key is never a v2 key.
const KDF_LABEL: &[u8] = b"gatekeeper knock v1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("bad key {0:?}: expected 32 bytes in base64")]
    Encoding(String),
    #[error("the peer's public key is a low-order point: no shared secret")]
    LowOrder,
}

/// 16 bytes naming a client key: SHA-256 of its public key, truncated.
pub type KeyId = [u8; 16];

/// The AEAD key a client and the gateway share.
pub type SessionKey = [u8; 32];

pub fn key_id(public: &PublicKey) -> KeyId {
    let digest = Sha256::digest(public.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// HKDF-SHA256 over the X25519 secret, bound to the version, the client's
/// key id and the gateway's public key.
pub fn session_key(
    own: &StaticSecret,
    peer: &PublicKey,
    key_id: &KeyId,
    server: &PublicKey,
) -> Result<SessionKey, KeyError> {
    let shared = Agreement::new(own).agree(peer)?;
    let mut info = Vec::with_capacity(KDF_LABEL.len() + 16 + 32);
    info.extend_from_slice(KDF_LABEL);
    info.extend_from_slice(key_id);
    info.extend_from_slice(server.as_bytes());
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(None, &shared)
        .expand(&info, &mut key)
        .map_err(|_| KeyError::LowOrder)?;
    Ok(key)
}

/// A fresh secret from the OS's random source.
pub fn generate() -> StaticSecret {
    StaticSecret::random_from_rng(rand_core::OsRng)
}

/// A static secret kept to agree with many peers: the gateway's knock
/// key, which agrees once with every v2 knock's ephemeral key, so this
/// X25519 is most of what verifying a v2 knock costs. The gateway build
/// agrees with AWS-LC's (assembly, about twice as fast as x25519-dalek's
/// portable arithmetic: README, "knock"); the client build, which opens
/// no knocks, with x25519-dalek.
pub struct Agreement {
    #[cfg(feature = "gateway")]
    secret: aws_lc_rs::agreement::PrivateKey,
    #[cfg(not(feature = "gateway"))]
    secret: StaticSecret,
}

impl Agreement {
    pub fn new(secret: &StaticSecret) -> Agreement {
        #[cfg(feature = "gateway")]
        let secret =
            aws_lc_rs::agreement::PrivateKey::from_private_key(&aws_lc_rs::agreement::X25519, secret.as_bytes())
                .expect("any 32 bytes are an X25519 secret");
        #[cfg(not(feature = "gateway"))]
        let secret = secret.clone();
        Agreement { secret }
    }

    /// The shared secret with `peer`, refusing a low-order point (whose
    /// shared secret is all zeros whatever the secret).
    pub fn agree(&self, peer: &PublicKey) -> Result<[u8; 32], KeyError> {
        #[cfg(feature = "gateway")]
        {
            use aws_lc_rs::agreement::{UnparsedPublicKey, X25519, agree};
            agree(
                &self.secret,
                UnparsedPublicKey::new(&X25519, peer.as_bytes()),
                KeyError::LowOrder,
                |shared| shared.try_into().map_err(|_| KeyError::LowOrder),
            )
        }
        #[cfg(not(feature = "gateway"))]
        {
            let shared = self.secret.diffie_hellman(peer);
            if !shared.was_contributory() {
                return Err(KeyError::LowOrder);
            }
            Ok(*shared.as_bytes())
        }
    }
}

pub fn encode(bytes: &[u8; 32]) -> String {
    STANDARD.encode(bytes)
}

fn decode(s: &str) -> Result<[u8; 32], KeyError> {
    STANDARD
        .decode(s.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| KeyError::Encoding(s.chars().take(12).collect()))
}

pub fn decode_secret(s: &str) -> Result<StaticSecret, KeyError> {
    decode(s).map(StaticSecret::from)
}

pub fn decode_public(s: &str) -> Result<PublicKey, KeyError> {
    decode(s).map(PublicKey::from)
}

/// The gateway's knock keys: the current one, and the one it replaced,
/// still accepted until `accepted_until` so that devices have time to
/// learn the new one (`gatekeeper rotate-key`).
///
/// As text (the state directory's `server.key`, the cluster's
/// `gatekeeper:server_key`): the current secret in base64 on the first
/// line, then optionally `previous BASE64 until UNIX_SECONDS`. A file of
/// one line, as written before rotation existed, has no previous key.
#[derive(Clone)]
pub struct ServerKeys {
    pub current: StaticSecret,
    pub previous: Option<Retiring>,
}

/// A replaced server key and when it stops being accepted. It is kept
/// after that, so that a knock sealed for it is recognised and audited
/// as such until the next rotation replaces it.
#[derive(Clone)]
pub struct Retiring {
    pub secret: StaticSecret,
    /// Unix seconds.
    pub accepted_until: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ServerKeysError {
    #[error("no key on the first line")]
    Empty,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("line {0}: expected `previous BASE64 until UNIX_SECONDS`")]
    Previous(usize),
}

impl ServerKeys {
    pub fn new(current: StaticSecret) -> ServerKeys {
        ServerKeys {
            current,
            previous: None,
        }
    }

    pub fn parse(text: &str) -> Result<ServerKeys, ServerKeysError> {
        let mut lines = text.lines().map(str::trim).enumerate().filter(|(_, l)| !l.is_empty());
        let (_, first) = lines.next().ok_or(ServerKeysError::Empty)?;
        let mut keys = ServerKeys::new(decode_secret(first)?);
        for (i, line) in lines {
            let bad = || ServerKeysError::Previous(i + 1);
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["previous", key, "until", until] if keys.previous.is_none() => {
                    keys.previous = Some(Retiring {
                        secret: decode_secret(key)?,
                        accepted_until: until.parse().map_err(|_| bad())?,
                    });
                }
                _ => return Err(bad()),
            }
        }
        Ok(keys)
    }

    pub fn to_text(&self) -> String {
        let mut text = format!("{}\n", encode(&self.current.to_bytes()));
        if let Some(p) = &self.previous {
            text += &format!("previous {} until {}\n", encode(&p.secret.to_bytes()), p.accepted_until);
        }
        text
    }

    /// A new current key; this one accepted for `overlap` seconds more
    /// from `unix_now`. A key retired earlier is forgotten.
    pub fn rotate(&self, unix_now: u64, overlap: u64) -> ServerKeys {
        ServerKeys {
            current: generate(),
            previous: Some(Retiring {
                secret: self.current.clone(),
                accepted_until: unix_now.saturating_add(overlap),
            }),
        }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey::from(&self.current)
    }
}

impl PartialEq for ServerKeys {
    fn eq(&self, other: &ServerKeys) -> bool {
        self.to_text() == other.to_text()
    }
}

impl Eq for ServerKeys {}

/// Never the secrets.
impl std::fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKeys")
            .field("current", &encode(self.public().as_bytes()))
            .field("previous_until", &self.previous.as_ref().map(|p| p.accepted_until))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_matches_x25519_dalek_and_refuses_low_order_points() {
        let (a, b) = (generate(), generate());
        let (pa, pb) = (PublicKey::from(&a), PublicKey::from(&b));
        let shared = Agreement::new(&a).agree(&pb).unwrap();
        assert_eq!(shared, *b.diffie_hellman(&pa).as_bytes());
        // Zero and a point of order 8 (RFC 7748's small-order list).
        let mut order8 = [0u8; 32];
        order8[0] = 0xe0;
        order8[1..].copy_from_slice(&[
            0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a, 0xda, 0x09, 0x8d,
            0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00,
        ]);
        for low in [[0u8; 32], order8] {
            assert_eq!(Agreement::new(&a).agree(&PublicKey::from(low)), Err(KeyError::LowOrder));
        }
    }

    #[test]
    fn server_keys_read_back_what_they_write_and_the_one_line_form() {
        let one = ServerKeys::new(generate());
        assert_eq!(ServerKeys::parse(&one.to_text()).unwrap(), one);
        assert!(
            ServerKeys::parse(&encode(&one.current.to_bytes()))
                .unwrap()
                .previous
                .is_none()
        );
        let rotated = one.rotate(1000, 60);
        let back = ServerKeys::parse(&rotated.to_text()).unwrap();
        assert_eq!(back, rotated);
        let previous = back.previous.unwrap();
        assert_eq!(previous.accepted_until, 1060);
        assert_eq!(previous.secret.to_bytes(), one.current.to_bytes());
        assert_ne!(back.current.to_bytes(), one.current.to_bytes());
    }

    #[test]
    fn broken_server_keys_name_the_line() {
        assert_eq!(ServerKeys::parse("\n \n"), Err(ServerKeysError::Empty));
        let key = encode(&[7; 32]);
        assert_eq!(
            ServerKeys::parse(&format!("{key}\nprevious {key} until soon\n")),
            Err(ServerKeysError::Previous(2))
        );
        assert_eq!(
            ServerKeys::parse(&format!("{key}\nnext {key}\n")),
            Err(ServerKeysError::Previous(2))
        );
        assert!(matches!(ServerKeys::parse("short"), Err(ServerKeysError::Key(_))));
    }
}
