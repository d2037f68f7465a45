//! Knock packet v2 (a contract; `docs/knock-v2.md` has the byte diagram
//! and a test vector): nothing in it names the device, and no two knocks
//! of one device share a byte beyond the prefix.
//!
//! ```text
//! 0      3   version prefix 0x80 0x86 0x02
//! 3      32  E: an ephemeral X25519 public key, fresh per knock
//! 35     8   flood tag: SipHash-2-4(tag key, E || nonce), little-endian
//! 43     48  the client's public key C, sealed: XChaCha20-Poly1305(identity key, nonce, C, aad = bytes 0..43)
//! 91     n   the payload, sealed: XChaCha20-Poly1305(payload key, nonce, JSON padded to 64 bytes, aad = bytes 0..91)
//! 91+n   24  nonce
//! ```
//!
//! With S the gateway's public knock key, `es = X25519(e, S)`, and K the
//! v1 session key of C and S (an X25519 of the two static keys, which the
//! gateway derives once per client):
//!
//! - identity key = HKDF-SHA256(es, info = "gatekeeper knock v2 identity" || E || S)
//! - payload key = HKDF-SHA256(es || K, info = "gatekeeper knock v2 payload" || E || C || S)
//! - tag key = HKDF-SHA256(S, info = "gatekeeper knock v2 flood tag"), 16 bytes
//!
//! The identity is what Noise IK's first message hides the same way: only
//! the gateway's secret opens it, and only the device's secret makes a
//! payload key the gateway agrees with. Verifying costs the gateway one
//! X25519 more than v1. The tag key is known to every enrolled device
//! and to nobody without a credential: the gate drops knocks without a
//! valid tag before anything else, as it drops v1 knocks with an unknown
//! key id.

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload as AeadInput},
};
use gatekeeper_common::{
    knock::{self, MAX_LEN, PREFIX_V2, V2_EPHEMERAL_AT, V2_MIN_LEN, V2_TAG_AT},
    maps::{TAG_KEY_SLOTS, TagKey},
};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use super::{NONCE_LEN, WireError};
use crate::knock::{
    keys::{Agreement, ServerKeys, SessionKey},
    payload::Payload,
};

/// Where the sealed identity and the sealed payload start.
const IDENTITY_AT: usize = V2_TAG_AT + 8;
const PAYLOAD_AT: usize = IDENTITY_AT + 32 + 16;
/// The payload's JSON is padded with spaces to a multiple of this, so a
/// knock's length says little about which device sent it.
const PAD_TO: usize = 64;

pub const PREFIX: [u8; 3] = PREFIX_V2;

/// The flood tag keys the gate accepts at `unix_now` for the gateway's
/// knock keys: the current one's, and the previous one's while a
/// rotation's overlap lasts (else unused). Once it ends the gate drops
/// the old key's v2 knocks, so a tag key that leaked is dead after one
/// rotation with a short overlap, whoever still holds it.
pub fn tag_keys(server: &ServerKeys, unix_now: u64) -> [TagKey; TAG_KEY_SLOTS as usize] {
    let previous = server
        .previous
        .as_ref()
        .filter(|p| unix_now < p.accepted_until)
        .map(|p| tag_key(&PublicKey::from(&p.secret)));
    [tag_key(&PublicKey::from(&server.current)), previous.unwrap_or([0, 0])]
}

/// The flood tag key for the gateway's public knock key `server`.
pub fn tag_key(server: &PublicKey) -> TagKey {
    let mut key = [0u8; 16];
    Hkdf::<Sha256>::new(None, server.as_bytes())
        .expand(b"gatekeeper knock v2 flood tag", &mut key)
        .expect("16 bytes is a valid HKDF-SHA256 length");
    let (a, b) = key.split_at(8);
    [
        u64::from_le_bytes(a.try_into().expect("8 bytes")),
        u64::from_le_bytes(b.try_into().expect("8 bytes")),
    ]
}

fn identity_key(es: &[u8; 32], ephemeral: &PublicKey, server: &PublicKey) -> [u8; 32] {
    let mut info = Vec::with_capacity(64 + 28);
    info.extend_from_slice(b"gatekeeper knock v2 identity");
    info.extend_from_slice(ephemeral.as_bytes());
    info.extend_from_slice(server.as_bytes());
    expand(es, &info)
}

fn payload_key(
    es: &[u8; 32],
    session: &SessionKey,
    ephemeral: &PublicKey,
    client: &PublicKey,
    server: &PublicKey,
) -> [u8; 32] {
    let mut ikm = [0u8; 64];
    ikm[..32].copy_from_slice(es);
    ikm[32..].copy_from_slice(session);
    let mut info = Vec::with_capacity(96 + 27);
    info.extend_from_slice(b"gatekeeper knock v2 payload");
    info.extend_from_slice(ephemeral.as_bytes());
    info.extend_from_slice(client.as_bytes());
    info.extend_from_slice(server.as_bytes());
    expand(&ikm, &info)
}

fn expand(ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(None, ikm)
        .expand(info, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    key
}

/// Builds a v2 knock from the client `client` (whose v1 session key with
/// `server` is `session`), with the ephemeral secret `ephemeral` and
/// `nonce`, both fresh per knock.
pub fn seal(
    client: &PublicKey,
    session: &SessionKey,
    server: &PublicKey,
    ephemeral: &StaticSecret,
    nonce: &[u8; NONCE_LEN],
    payload: &Payload,
) -> Result<Vec<u8>, WireError> {
    let mut plain = serde_json::to_vec(payload).map_err(|e| WireError::Json(e.to_string()))?;
    plain.resize(plain.len().div_ceil(PAD_TO) * PAD_TO, b' ');
    let e = PublicKey::from(ephemeral);
    let es = Agreement::new(ephemeral)
        .agree(server)
        .map_err(|_| WireError::LowOrder)?;
    let mut out = Vec::with_capacity(PAYLOAD_AT + plain.len() + 16 + NONCE_LEN);
    out.extend_from_slice(&PREFIX_V2);
    out.extend_from_slice(e.as_bytes());
    let tag = knock::flood_tag(tag_key(server), &knock::tag_words(e.as_bytes(), nonce));
    out.extend_from_slice(&tag.to_le_bytes());
    let sealed_identity = XChaCha20Poly1305::new((&identity_key(&es, &e, server)).into())
        .encrypt(
            XNonce::from_slice(nonce),
            AeadInput {
                msg: client.as_bytes(),
                aad: &out,
            },
        )
        .map_err(|_| WireError::TooLarge(32))?;
    out.extend_from_slice(&sealed_identity);
    let ciphertext = XChaCha20Poly1305::new((&payload_key(&es, session, &e, client, server)).into())
        .encrypt(XNonce::from_slice(nonce), AeadInput { msg: &plain, aad: &out })
        .map_err(|_| WireError::TooLarge(plain.len()))?;
    out.extend_from_slice(&ciphertext);
    out.extend_from_slice(nonce);
    if out.len() > MAX_LEN {
        return Err(WireError::TooLarge(out.len()));
    }
    Ok(out)
}

/// A v2 knock split into its parts, before anything is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed<'a> {
    pub nonce: [u8; NONCE_LEN],
    packet: &'a [u8],
}

/// Splits a v2 knock; checks only the prefix and the length.
pub fn split(packet: &[u8]) -> Result<Sealed<'_>, WireError> {
    if !packet.starts_with(&PREFIX_V2) {
        return Err(WireError::Prefix);
    }
    if !knock::plausible_v2_len(packet.len()) {
        return Err(WireError::Length(packet.len()));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&packet[packet.len() - NONCE_LEN..]);
    Ok(Sealed { nonce, packet })
}

/// One of the gateway's knock keys as v2 needs it, derived once: the
/// secret, its public half and its flood tag key (each of which costs
/// about what an agreement does to derive).
pub struct GatewayKey {
    secret: Agreement,
    public: PublicKey,
    tag: TagKey,
}

impl GatewayKey {
    pub fn new(secret: &StaticSecret) -> GatewayKey {
        let public = PublicKey::from(secret);
        GatewayKey {
            secret: Agreement::new(secret),
            public,
            tag: tag_key(&public),
        }
    }
}

/// Who sent a v2 knock, as the gateway's secret revealed it: the client's
/// public key, and what the payload key still needs.
pub struct Opened {
    pub client: PublicKey,
    es: [u8; 32],
}

impl Sealed<'_> {
    fn ephemeral(&self) -> PublicKey {
        let mut e = [0u8; 32];
        e.copy_from_slice(&self.packet[V2_EPHEMERAL_AT..V2_TAG_AT]);
        PublicKey::from(e)
    }

    /// Whether the flood tag was made under `key` (the gate checks it
    /// first; the daemon again, for knocks that reached it otherwise).
    fn tagged_by(&self, key: TagKey) -> bool {
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&self.packet[V2_TAG_AT..IDENTITY_AT]);
        let e = self.ephemeral();
        knock::flood_tag(key, &knock::tag_words(e.as_bytes(), &self.nonce)) == u64::from_le_bytes(tag)
    }

    /// Opens the sealed identity with the gateway's key `gateway`, once
    /// its flood tag shows the knock was made for that key.
    pub fn identity(&self, gateway: &GatewayKey) -> Result<Opened, WireError> {
        if !self.tagged_by(gateway.tag) {
            return Err(WireError::Tag);
        }
        let e = self.ephemeral();
        let es = gateway.secret.agree(&e).map_err(|_| WireError::LowOrder)?;
        let plain = XChaCha20Poly1305::new((&identity_key(&es, &e, &gateway.public)).into())
            .decrypt(
                XNonce::from_slice(&self.nonce),
                AeadInput {
                    msg: &self.packet[IDENTITY_AT..PAYLOAD_AT],
                    aad: &self.packet[..IDENTITY_AT],
                },
            )
            .map_err(|_| WireError::Tag)?;
        let client: [u8; 32] = plain.try_into().map_err(|_| WireError::Tag)?;
        Ok(Opened {
            client: PublicKey::from(client),
            es,
        })
    }

    /// Decrypts and parses the payload, once [`Self::identity`] named the
    /// client, with the v1 session key `session` it shares with `gateway`.
    pub fn open(&self, opened: &Opened, session: &SessionKey, gateway: &GatewayKey) -> Result<Payload, WireError> {
        let e = self.ephemeral();
        let key = payload_key(&opened.es, session, &e, &opened.client, &gateway.public);
        let end = self.packet.len() - NONCE_LEN;
        let plain = XChaCha20Poly1305::new((&key).into())
            .decrypt(
                XNonce::from_slice(&self.nonce),
                AeadInput {
                    msg: &self.packet[PAYLOAD_AT..end],
                    aad: &self.packet[..PAYLOAD_AT],
                },
            )
            .map_err(|_| WireError::Tag)?;
        serde_json::from_slice(&plain).map_err(|e| WireError::Json(e.to_string()))
    }
}

const _: () = assert!(PAYLOAD_AT + 16 + NONCE_LEN == V2_MIN_LEN);

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::knock::{
        keys::{key_id, session_key},
        wire::tests::arr,
    };

    fn vector() -> HashMap<&'static str, &'static str> {
        crate::knock::wire::tests::vector(include_str!("../../../../docs/knock-v2.md"))
    }

    /// The vector's keys and its packet, built by this implementation.
    fn build() -> (StaticSecret, PublicKey, SessionKey, Payload, Vec<u8>) {
        let v = vector();
        let server = StaticSecret::from(arr::<32>(v["server_secret"]));
        let client = StaticSecret::from(arr::<32>(v["client_secret"]));
        let (sp, cp) = (PublicKey::from(&server), PublicKey::from(&client));
        let session = session_key(&client, &sp, &key_id(&cp), &sp).unwrap();
        let payload: Payload = serde_json::from_str(v["payload"]).unwrap();
        let ephemeral = StaticSecret::from(arr::<32>(v["ephemeral_secret"]));
        let packet = seal(&cp, &session, &sp, &ephemeral, &arr(v["nonce"]), &payload).unwrap();
        (server, cp, session, payload, packet)
    }

    #[test]
    fn implementation_matches_the_documented_vector() {
        let v = vector();
        let (server, client, session, payload, packet) = build();
        let sp = PublicKey::from(&server);
        let key = tag_key(&sp);
        let mut key_bytes = key[0].to_le_bytes().to_vec();
        key_bytes.extend_from_slice(&key[1].to_le_bytes());
        assert_eq!(crate::hex::encode(&key_bytes), v["tag_key"]);
        assert_eq!(crate::hex::encode(&packet), v["packet"]);

        let sealed = split(&packet).unwrap();
        assert!(sealed.tagged_by(key));
        let gateway = GatewayKey::new(&server);
        let opened = sealed.identity(&gateway).unwrap();
        assert_eq!(opened.client, client);
        assert_eq!(sealed.open(&opened, &session, &gateway).unwrap(), payload);
    }

    #[test]
    fn the_previous_tag_key_lasts_as_long_as_the_overlap() {
        let old = ServerKeys::new(crate::knock::keys::generate());
        let rotated = old.rotate(1000, 60);
        let [current, previous] = tag_keys(&rotated, 1059);
        assert_eq!(current, tag_key(&rotated.public()));
        assert_eq!(previous, tag_key(&old.public()));
        assert_eq!(tag_keys(&rotated, 1060), [current, [0, 0]]);
        assert_eq!(tag_keys(&old, 1059)[1], [0, 0]);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let (server, _, session, _, packet) = build();
        let gateway = GatewayKey::new(&server);
        for i in 0..packet.len() {
            let mut bad = packet.clone();
            bad[i] ^= 0x01;
            let outcome = split(&bad).and_then(|s| {
                let opened = s.identity(&gateway)?;
                s.open(&opened, &session, &gateway)
            });
            assert!(outcome.is_err(), "flipping byte {i} must not verify");
        }
    }

    #[test]
    fn two_knocks_of_one_device_share_nothing_but_the_prefix_and_length() {
        let (server, client, session, payload, _) = build();
        let sp = PublicKey::from(&server);
        let knock = || {
            let nonce: [u8; NONCE_LEN] = rand_core::RngCore::next_u64(&mut rand_core::OsRng)
                .to_le_bytes()
                .repeat(3)
                .try_into()
                .unwrap();
            seal(
                &client,
                &session,
                &sp,
                &crate::knock::keys::generate(),
                &nonce,
                &payload,
            )
            .unwrap()
        };
        let (a, b) = (knock(), knock());
        assert_eq!(a.len(), b.len());
        let same = a.iter().zip(&b).skip(3).filter(|(x, y)| x == y).count();
        // Random bytes agree by chance about once in 256.
        assert!(same < a.len() / 32, "{same} of {} bytes alike", a.len());
        assert!(
            !a.windows(32).any(|w| w == client.as_bytes()),
            "the client's key is not in the clear"
        );
    }
}
