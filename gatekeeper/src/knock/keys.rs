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
    let shared = own.diffie_hellman(peer);
    if !shared.was_contributory() {
        return Err(KeyError::LowOrder);
    }
    let mut info = Vec::with_capacity(KDF_LABEL.len() + 16 + 32);
    info.extend_from_slice(KDF_LABEL);
    info.extend_from_slice(key_id);
    info.extend_from_slice(server.as_bytes());
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(None, shared.as_bytes())
        .expand(&info, &mut key)
        .map_err(|_| KeyError::LowOrder)?;
    Ok(key)
}

/// A fresh secret from the OS's random source.
pub fn generate() -> StaticSecret {
    StaticSecret::random_from_rng(rand_core::OsRng)
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
