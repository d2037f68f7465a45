//! Knock packet v1 (a contract; `docs/knock-v1.md` has the byte diagram and
//! a test vector):
//!
//! ```text
//! 0      3   version prefix 0x80 0x86 0x01
//! 3      16  key id: SHA-256(client public key)[0..16]
//! 19     n   XChaCha20-Poly1305(session key, nonce, JSON payload, aad = bytes 0..19); n includes the 16-byte tag
//! 19+n   24  nonce
//! ```

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload as AeadInput},
};
use gatekeeper_common::knock::{MAX_LEN, MIN_LEN, PREFIX};
use thiserror::Error;

use super::{
    keys::{KeyId, SessionKey},
    payload::Payload,
};

pub mod v2;

pub const NONCE_LEN: usize = 24;
const HEADER_LEN: usize = 3 + 16;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a knock: the version prefix is missing")]
    Prefix,
    #[error("{0} bytes is outside the knock length bounds ({MIN_LEN}..={MAX_LEN})")]
    Length(usize),
    #[error("the tag does not verify: wrong key, or the packet was altered")]
    Tag,
    #[error("the payload is not valid knock JSON: {0}")]
    Json(String),
    #[error("the payload is too large for one knock ({0} bytes)")]
    TooLarge(usize),
    #[error("a public key in the knock, or the gateway's, is a low-order point: no shared secret")]
    LowOrder,
}

/// A knock split into its parts, before decryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed<'a> {
    pub key_id: KeyId,
    pub nonce: [u8; NONCE_LEN],
    header: &'a [u8],
    ciphertext: &'a [u8],
}

/// Splits a knock; checks only the prefix and the length.
pub fn split(packet: &[u8]) -> Result<Sealed<'_>, WireError> {
    if !packet.starts_with(&PREFIX) {
        return Err(WireError::Prefix);
    }
    if !(MIN_LEN..=MAX_LEN).contains(&packet.len()) {
        return Err(WireError::Length(packet.len()));
    }
    let (header, rest) = packet.split_at(HEADER_LEN);
    let (ciphertext, nonce) = rest.split_at(rest.len() - NONCE_LEN);
    let mut key_id = [0u8; 16];
    key_id.copy_from_slice(&header[3..]);
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(nonce);
    Ok(Sealed {
        key_id,
        nonce: n,
        header,
        ciphertext,
    })
}

impl Sealed<'_> {
    /// Decrypts and parses the payload with the client's session key.
    pub fn open(&self, key: &SessionKey) -> Result<Payload, WireError> {
        let cipher = XChaCha20Poly1305::new(key.into());
        let plain = cipher
            .decrypt(
                XNonce::from_slice(&self.nonce),
                AeadInput {
                    msg: self.ciphertext,
                    aad: self.header,
                },
            )
            .map_err(|_| WireError::Tag)?;
        serde_json::from_slice(&plain).map_err(|e| WireError::Json(e.to_string()))
    }
}

/// The nonce of a v1 or a v2 knock: its id in the audit trail and in the
/// device's journal.
pub fn nonce_of(packet: &[u8]) -> Result<[u8; NONCE_LEN], WireError> {
    if packet.starts_with(&v2::PREFIX) {
        v2::split(packet).map(|s| s.nonce)
    } else {
        split(packet).map(|s| s.nonce)
    }
}

/// Builds a knock: `payload` sealed under `key` with `nonce`.
pub fn seal(
    key_id: &KeyId,
    key: &SessionKey,
    nonce: &[u8; NONCE_LEN],
    payload: &Payload,
) -> Result<Vec<u8>, WireError> {
    let plain = serde_json::to_vec(payload).map_err(|e| WireError::Json(e.to_string()))?;
    seal_bytes(key_id, key, nonce, &plain)
}

/// Seals any plaintext; [`seal`] is this over the JSON of a payload.
pub fn seal_bytes(
    key_id: &KeyId,
    key: &SessionKey,
    nonce: &[u8; NONCE_LEN],
    plain: &[u8],
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + 16 + NONCE_LEN);
    out.extend_from_slice(&PREFIX);
    out.extend_from_slice(key_id);
    let cipher = XChaCha20Poly1305::new(key.into());
    let ciphertext = cipher
        .encrypt(XNonce::from_slice(nonce), AeadInput { msg: plain, aad: &out })
        .map_err(|_| WireError::TooLarge(plain.len()))?;
    out.extend_from_slice(&ciphertext);
    out.extend_from_slice(nonce);
    if out.len() > MAX_LEN {
        return Err(WireError::TooLarge(out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use x25519_dalek::{PublicKey, StaticSecret};

    use super::*;
    use crate::knock::keys::{key_id, session_key};

    /// The `name = value` lines of a format document's test vector.
    pub(super) fn vector(doc: &'static str) -> HashMap<&'static str, &'static str> {
        doc.lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        crate::hex::decode(s).unwrap()
    }

    pub(super) fn arr<const N: usize>(s: &str) -> [u8; N] {
        unhex(s).try_into().unwrap()
    }

    fn v1_vector() -> HashMap<&'static str, &'static str> {
        vector(include_str!("../../../docs/knock-v1.md"))
    }

    #[test]
    fn implementation_matches_the_documented_vector() {
        let v = v1_vector();
        let server = StaticSecret::from(arr::<32>(v["server_secret"]));
        let client = StaticSecret::from(arr::<32>(v["client_secret"]));
        let (sp, cp) = (PublicKey::from(&server), PublicKey::from(&client));
        assert_eq!(sp.as_bytes(), &arr::<32>(v["server_public"]));
        assert_eq!(cp.as_bytes(), &arr::<32>(v["client_public"]));
        let id = key_id(&cp);
        assert_eq!(id, arr::<16>(v["key_id"]));
        let k = session_key(&client, &sp, &id, &sp).unwrap();
        assert_eq!(k, arr::<32>(v["session_key"]));
        assert_eq!(
            session_key(&server, &cp, &id, &sp).unwrap(),
            k,
            "both sides derive the same key"
        );

        let payload: Payload = serde_json::from_str(v["payload"]).unwrap();
        let packet = seal(&id, &k, &arr(v["nonce"]), &payload).unwrap();
        assert_eq!(packet, unhex(v["packet"]));
        let sealed = split(&packet).unwrap();
        assert_eq!(sealed.key_id, id);
        assert_eq!(sealed.open(&k).unwrap(), payload);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let v = v1_vector();
        let k = arr::<32>(v["session_key"]);
        let packet = unhex(v["packet"]);
        for i in 0..packet.len() {
            let mut bad = packet.clone();
            bad[i] ^= 0x01;
            let outcome = split(&bad).and_then(|s| s.open(&k));
            assert!(outcome.is_err(), "flipping byte {i} must not verify");
        }
    }

    #[test]
    fn lengths_outside_the_bounds_are_refused() {
        let mut short = PREFIX.to_vec();
        short.resize(MIN_LEN - 1, 0);
        assert_eq!(split(&short), Err(WireError::Length(MIN_LEN - 1)));
        let mut long = PREFIX.to_vec();
        long.resize(MAX_LEN + 1, 0);
        assert_eq!(split(&long), Err(WireError::Length(MAX_LEN + 1)));
        assert_eq!(split(b"GET / HTTP/1.1"), Err(WireError::Prefix));
    }
}
