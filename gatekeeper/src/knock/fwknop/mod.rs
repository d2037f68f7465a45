//! fwknop's single-packet authorization, as the stock client (fwknop
//! 2.6.10, FKO protocol 3.0.0) sends it with `--use-hmac`, so devices that
//! run fwknop today can knock on Gatekeeper unchanged.
//!
//! On the wire a packet is base64 text (no `=` padding) in two parts:
//!
//! ```text
//! ciphertext (base64, its constant "U2FsdGVkX1" prefix left off) || HMAC-SHA256 (43 chars)
//! ```
//!
//! - The HMAC is over the ciphertext's base64 text with the prefix put
//!   back, under the client's HMAC key. It is checked first: no key id is
//!   sent, so it is also how the client is found, and nothing is
//!   decrypted for a packet no enrolled key authenticates.
//! - The ciphertext decodes to `Salted__`, an 8-byte salt and AES-256-CBC
//!   blocks (PKCS#7 padding). Key and IV are OpenSSL's `EVP_BytesToKey`
//!   with MD5: `D1 = MD5(key || salt)`, `Di = MD5(Di-1 || key || salt)`,
//!   the first 32 bytes the key, the next 16 the IV.
//! - The plaintext is colon-separated: a 16-digit random value, the user
//!   (base64), the Unix timestamp, the protocol version, the message
//!   type, the message (base64: `IP,proto/port[,proto/port...]`), the
//!   client timeout for type 3, and last the SHA-256 digest (base64) of
//!   everything before it.
//!
//! [`access`] reads fwknopd's `access.conf` for `gatekeeper import fwknop`.
//!
//! Accepted: access requests (type 1) and access requests with a client
//! timeout (type 3). Commands (0) are never run, and the NAT types (2, 4,
//! 5, 6), which ask fwknopd to forward ports, are refused by name.

pub mod access;

use aes::cipher::{BlockDecryptMut, KeyIvInit, block_padding::Pkcs7};
use base64::{
    Engine,
    alphabet::STANDARD,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose},
};
use hmac::{Hmac, Mac};
use md5::Md5;
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::spec::{PortRange, PortSet, Proto};

/// The shortest and longest packets fwknopd reads (its `MIN_SPA_DATA_SIZE`
/// and `MAX_SPA_PACKET_LEN`).
pub const MIN_LEN: usize = 140;
pub const MAX_LEN: usize = 1500;

/// base64 of `Salted__`, which the client leaves off the front.
const SALTED_B64: &str = "U2FsdGVkX1";
const SALTED: &[u8] = b"Salted__";
/// Base64 of a SHA-256 digest without padding.
const SHA256_B64_LEN: usize = 43;
const RAND_DIGITS: usize = 16;

/// fwknop's base64: the standard alphabet, padding optional.
const B64: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FwknopError {
    #[error("{0} bytes: an fwknop packet is {MIN_LEN}-{MAX_LEN} characters of base64")]
    Length(usize),
    #[error("not base64 text")]
    NotBase64,
    #[error("no enrolled fwknop key authenticates it (wrong HMAC key, or not sent with --use-hmac)")]
    Unauthenticated,
    #[error("the ciphertext does not start with Salted__ and a salt")]
    NotSalted,
    #[error("the ciphertext is not whole AES blocks")]
    NotBlocks,
    #[error("it does not decrypt under the client's key (wrong KEY_BASE64)")]
    Decrypt,
    #[error("the digest does not match the message")]
    Digest,
    #[error("malformed field: {0}")]
    Field(&'static str),
    #[error("message type {0} is not an access request ({1})")]
    MessageType(u8, &'static str),
    #[error("the client's fwknop {0} is not base64")]
    Key(&'static str),
}

/// A client's fwknop keys as its record, `.fwknoprc` and fwknopd's
/// `access.conf` spell them. fwknop's keys are symmetric: the gateway
/// holds them as the device does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FwknopKeys {
    pub key_base64: String,
    pub hmac_key_base64: String,
}

impl FwknopKeys {
    /// Fresh keys of the sizes `fwknop --key-gen` makes: 32 bytes to
    /// encrypt, 64 for the HMAC.
    pub fn generate() -> FwknopKeys {
        let mut key = [0u8; 32];
        let mut hmac_key = [0u8; 64];
        OsRng.fill_bytes(&mut key);
        OsRng.fill_bytes(&mut hmac_key);
        FwknopKeys {
            key_base64: general_purpose::STANDARD.encode(key),
            hmac_key_base64: general_purpose::STANDARD.encode(hmac_key),
        }
    }

    /// The keys, decoded and ready to check packets.
    pub fn key(&self) -> Result<FwknopKey, FwknopError> {
        let decode = |what, text: &str| {
            general_purpose::STANDARD
                .decode(text)
                .ok()
                .filter(|k| !k.is_empty())
                .ok_or(FwknopError::Key(what))
        };
        Ok(FwknopKey::new(
            &decode("key_base64", &self.key_base64)?,
            &decode("hmac_key_base64", &self.hmac_key_base64)?,
        ))
    }

    /// The stanza for the device's `~/.fwknoprc`, so `fwknop -n NAME`
    /// knocks on `server`'s `port` for what `allow` names: single ports
    /// as they are, a range by its first port (fwknop asks for single
    /// ports), ICMP left out (fwknop cannot ask for it).
    pub fn rc_stanza(&self, name: &str, server: &str, port: u16, allow: &PortSet) -> String {
        let access: Vec<String> = allow
            .ranges
            .iter()
            .filter(|(proto, _)| *proto != Proto::Icmp)
            .map(|(proto, ports)| format!("{proto}/{}", ports.lo))
            .collect();
        format!(
            "[{name}]\nSPA_SERVER          {server}\nSPA_SERVER_PORT     {port}\nSPA_SERVER_PROTO    udp\nACCESS              {}\nALLOW_IP            source\nKEY_BASE64          {}\nHMAC_KEY_BASE64     {}\nUSE_HMAC            Y\nHMAC_DIGEST_TYPE    sha256\n",
            access.join(","),
            self.key_base64,
            self.hmac_key_base64
        )
    }
}

/// One device's fwknop keys: `KEY_BASE64` and `HMAC_KEY_BASE64`, decoded
/// (shown as `FwknopKey(..)`: logs never print them).
#[derive(Clone)]
pub struct FwknopKey {
    key: Vec<u8>,
    /// Keyed once: finding a packet's key among many costs one HMAC each.
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for FwknopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FwknopKey(..)")
    }
}

impl FwknopKey {
    pub fn new(key: &[u8], hmac_key: &[u8]) -> FwknopKey {
        FwknopKey {
            key: key.to_vec(),
            mac: <Hmac<Sha256> as Mac>::new_from_slice(hmac_key).expect("HMAC takes a key of any length"),
        }
    }
}

/// A packet split into its parts, not yet authenticated.
pub struct Packet<'a> {
    /// The ciphertext's base64, as sent (prefix left off).
    body: &'a str,
    hmac: Vec<u8>,
}

impl<'a> Packet<'a> {
    /// Splits `bytes` into ciphertext and HMAC; cheap checks only.
    pub fn split(bytes: &'a [u8]) -> Result<Packet<'a>, FwknopError> {
        if !(MIN_LEN..=MAX_LEN).contains(&bytes.len()) {
            return Err(FwknopError::Length(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| FwknopError::NotBase64)?;
        if !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        {
            return Err(FwknopError::NotBase64);
        }
        let (body, hmac) = text.split_at(text.len() - SHA256_B64_LEN);
        // Strict here: the HMAC's last character has spare bits, and a
        // second spelling of it must not pass (fwknopd compares the text).
        let hmac = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(hmac)
            .map_err(|_| FwknopError::NotBase64)?;
        Ok(Packet { body, hmac })
    }

    /// Whether `key`'s HMAC key made this packet (constant time).
    pub fn authenticated_by(&self, key: &FwknopKey) -> bool {
        let mut mac = key.mac.clone();
        mac.update(SALTED_B64.as_bytes());
        mac.update(self.body.as_bytes());
        mac.verify_slice(&self.hmac).is_ok()
    }

    /// Decrypts and parses the packet under `key`, whose HMAC key must
    /// already have authenticated it.
    pub fn open(&self, key: &FwknopKey) -> Result<Spa, FwknopError> {
        let raw = B64
            .decode(format!("{SALTED_B64}{}", self.body))
            .map_err(|_| FwknopError::NotBase64)?;
        let rest = raw.strip_prefix(SALTED).ok_or(FwknopError::NotSalted)?;
        if rest.len() < 8 + 16 {
            return Err(FwknopError::NotSalted);
        }
        let (salt, blocks) = rest.split_at(8);
        if !blocks.len().is_multiple_of(16) {
            return Err(FwknopError::NotBlocks);
        }
        let (aes_key, iv) = bytes_to_key(&key.key, salt);
        let mut buf = blocks.to_vec();
        let plain = cbc::Decryptor::<aes::Aes256>::new(&aes_key.into(), &iv.into())
            .decrypt_padded_mut::<Pkcs7>(&mut buf)
            .map_err(|_| FwknopError::Decrypt)?;
        let text = std::str::from_utf8(plain).map_err(|_| FwknopError::Decrypt)?;
        Spa::parse(text)
    }

    /// What the replay cache remembers of this packet: its SHA-256 (what
    /// fwknopd's digest cache keeps), cut to the cache's key size.
    pub fn replay_id(&self) -> [u8; 24] {
        let digest = Sha256::new()
            .chain_update(self.body.as_bytes())
            .chain_update(&self.hmac)
            .finalize();
        let mut id = [0u8; 24];
        id.copy_from_slice(&digest[..24]);
        id
    }
}

/// OpenSSL's `EVP_BytesToKey(MD5, count 1)` for AES-256-CBC: key and IV.
fn bytes_to_key(password: &[u8], salt: &[u8]) -> ([u8; 32], [u8; 16]) {
    let mut out = [0u8; 48];
    let mut previous: Option<[u8; 16]> = None;
    for chunk in out.chunks_mut(16) {
        let mut md5 = Md5::new();
        if let Some(p) = previous {
            md5.update(p);
        }
        md5.update(password);
        md5.update(salt);
        let d: [u8; 16] = md5.finalize().into();
        chunk.copy_from_slice(&d);
        previous = Some(d);
    }
    let (mut key, mut iv) = ([0u8; 32], [0u8; 16]);
    key.copy_from_slice(&out[..32]);
    iv.copy_from_slice(&out[32..]);
    (key, iv)
}

/// What an fwknop access request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spa {
    pub user: String,
    pub timestamp: u64,
    pub version: String,
    pub message_type: u8,
    /// The address to open for, as the client wrote it (`-a`, or what
    /// `-R` resolved); `0.0.0.0` with `-s`: the packet's own source.
    pub allow_ip: std::net::IpAddr,
    pub access: Vec<(Proto, PortRange)>,
    /// Seconds the client asked the opening to last (type 3).
    pub client_timeout: Option<u32>,
}

impl Spa {
    fn parse(text: &str) -> Result<Spa, FwknopError> {
        let (encoded, digest) = text.rsplit_once(':').ok_or(FwknopError::Field("digest"))?;
        if digest.len() != SHA256_B64_LEN {
            return Err(FwknopError::Field("digest (only SHA-256 digests are accepted)"));
        }
        let expected = B64.encode(Sha256::digest(encoded.as_bytes()));
        if expected != digest {
            return Err(FwknopError::Digest);
        }
        let fields: Vec<&str> = encoded.split(':').collect();
        let rand = fields.first().copied().unwrap_or("");
        if rand.len() != RAND_DIGITS || !rand.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FwknopError::Field("random value"));
        }
        let field = |i: usize, what: &'static str| fields.get(i).copied().ok_or(FwknopError::Field(what));
        let b64_text = |i: usize, what: &'static str| -> Result<String, FwknopError> {
            let bytes = B64.decode(field(i, what)?).map_err(|_| FwknopError::Field(what))?;
            String::from_utf8(bytes).map_err(|_| FwknopError::Field(what))
        };
        let user = b64_text(1, "user")?;
        let timestamp = field(2, "timestamp")?
            .parse()
            .map_err(|_| FwknopError::Field("timestamp"))?;
        let version = field(3, "version")?.to_string();
        let message_type: u8 = field(4, "message type")?
            .parse()
            .map_err(|_| FwknopError::Field("message type"))?;
        let expected_fields = match message_type {
            1 => 6,
            3 => 7,
            0 => return Err(FwknopError::MessageType(0, "commands are never run")),
            2 | 4..=6 => {
                return Err(FwknopError::MessageType(
                    message_type,
                    "NAT forwarding is not offered; knock for the service's own port",
                ));
            }
            _ => return Err(FwknopError::MessageType(message_type, "unknown")),
        };
        if fields.len() != expected_fields {
            return Err(FwknopError::Field("field count (a server_auth or NAT field?)"));
        }
        let message = b64_text(5, "message")?;
        let (allow_ip, access) = parse_access(&message)?;
        let client_timeout = match message_type {
            3 => Some(
                field(6, "client timeout")?
                    .parse()
                    .map_err(|_| FwknopError::Field("client timeout"))?,
            ),
            _ => None,
        };
        Ok(Spa {
            user,
            timestamp,
            version,
            message_type,
            allow_ip,
            access,
            client_timeout,
        })
    }
}

/// `IP,proto/port[,proto/port...]`.
fn parse_access(message: &str) -> Result<(std::net::IpAddr, Vec<(Proto, PortRange)>), FwknopError> {
    let mut parts = message.split(',');
    let ip = parts
        .next()
        .and_then(|ip| ip.parse().ok())
        .ok_or(FwknopError::Field("the message's address"))?;
    let access = parts
        .map(|p| {
            let (proto, port) = p
                .split_once('/')
                .ok_or(FwknopError::Field("the message's proto/port"))?;
            let proto: Proto = proto
                .parse()
                .map_err(|_| FwknopError::Field("the message's protocol"))?;
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or(FwknopError::Field("the message's port"))?;
            Ok((proto, PortRange { lo: port, hi: port }))
        })
        .collect::<Result<Vec<_>, FwknopError>>()?;
    if access.is_empty() {
        return Err(FwknopError::Field("the message names no proto/port"));
    }
    Ok((ip, access))
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD as PADDED;

    use super::*;

    /// Made by the stock client: `fwknop -A tcp/22 -a 10.0.0.2 -D
    /// 127.0.0.1 --use-hmac --test` with these keys.
    const KEY: &str = "Z2F0ZWtlZXBlci10ZXN0LWtleS0zMi1ieXRlcy1hYmM=";
    const HMAC_KEY: &str = "aGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaA==";
    const PACKET: &str = "94TjqCJUVhN9P+Rfk8PmCyzxfcTMTl1ipLwaBzk5+oSYJ+gxdrWZ3ppMYr7cpClmajUjvVy4Hrkn/TTQitW3fRcZ18SXuqduBA5MsnGaNqoqPkS8dg2bmGkKVzk0rsr6iWm+NNhpmzuxVL4jZ31gKL5Zjm5+ZNduMTJ3TLs2MeNdtfmHNw63gOHqg4kf3UUyUt6e3mrlDK7I";

    fn key() -> FwknopKey {
        FwknopKey::new(&PADDED.decode(KEY).unwrap(), &PADDED.decode(HMAC_KEY).unwrap())
    }

    #[test]
    fn the_stock_clients_packet_opens() {
        let packet = Packet::split(PACKET.as_bytes()).unwrap();
        assert!(packet.authenticated_by(&key()));
        let spa = packet.open(&key()).unwrap();
        assert_eq!(
            spa,
            Spa {
                user: "root".into(),
                timestamp: 1_796_218_391,
                version: "3.0.0".into(),
                message_type: 1,
                allow_ip: "10.0.0.2".parse().unwrap(),
                access: vec![(Proto::Tcp, PortRange { lo: 22, hi: 22 })],
                client_timeout: None,
            }
        );
    }

    #[test]
    fn other_keys_and_any_flipped_character_are_refused() {
        let packet = Packet::split(PACKET.as_bytes()).unwrap();
        let other_hmac = FwknopKey::new(&PADDED.decode(KEY).unwrap(), b"another hmac key");
        assert!(!packet.authenticated_by(&other_hmac));
        let other_key = FwknopKey::new(b"another encryption key", &PADDED.decode(HMAC_KEY).unwrap());
        assert!(packet.authenticated_by(&other_key), "the HMAC key alone authenticates");
        assert!(packet.open(&other_key).is_err(), "but only the right key decrypts");
        for i in 0..PACKET.len() {
            let mut flipped = PACKET.as_bytes().to_vec();
            flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
            let authenticated = Packet::split(&flipped).is_ok_and(|p| p.authenticated_by(&key()));
            assert!(!authenticated, "a flip at {i} still authenticates");
        }
        // The HMAC's last character carries two spare bits: "I" and "J"
        // decode alike, but only the text sent is accepted.
        let respelled = format!("{}J", &PACKET[..PACKET.len() - 1]);
        assert!(PACKET.ends_with('I'));
        assert!(Packet::split(respelled.as_bytes()).is_err());
    }

    #[test]
    fn lengths_and_alphabet_are_checked_before_anything_else() {
        assert_eq!(Packet::split(&[b'A'; 139]).err(), Some(FwknopError::Length(139)));
        assert_eq!(Packet::split(&[b'A'; 1501]).err(), Some(FwknopError::Length(1501)));
        assert_eq!(Packet::split(&[b'='; 200]).err(), Some(FwknopError::NotBase64));
        assert_eq!(Packet::split(&[0xff; 200]).err(), Some(FwknopError::NotBase64));
    }

    #[test]
    fn messages() {
        let digest = |m: &str| format!("{m}:{}", B64.encode(Sha256::digest(m.as_bytes())));
        let access = B64.encode("192.0.2.7,tcp/22,udp/53");
        let with_timeout = digest(&format!("1234567890123456:YWxpY2U:1700000000:3.0.0:3:{access}:45"));
        let spa = Spa::parse(&with_timeout).unwrap();
        assert_eq!(spa.client_timeout, Some(45));
        assert_eq!(spa.access.len(), 2);
        assert_eq!(spa.user, "alice");
        let command = digest("1234567890123456:YWxpY2U:1700000000:3.0.0:0:dG91Y2ggL3RtcC94");
        assert!(matches!(Spa::parse(&command), Err(FwknopError::MessageType(0, _))));
        let nat = digest(&format!(
            "1234567890123456:YWxpY2U:1700000000:3.0.0:2:{access}:MTAuMC4wLjUsMjI"
        ));
        assert!(matches!(Spa::parse(&nat), Err(FwknopError::MessageType(2, _))));
        let tampered = with_timeout.replace(":45:", ":46:");
        assert_eq!(Spa::parse(&tampered), Err(FwknopError::Digest));
        let short_rand = digest(&format!("123:YWxpY2U:1700000000:3.0.0:1:{access}"));
        assert_eq!(Spa::parse(&short_rand), Err(FwknopError::Field("random value")));
        for bad in ["192.0.2.7", "192.0.2.7,tcp/0", "192.0.2.7,sctp/22", "nowhere,tcp/22"] {
            let m = digest(&format!(
                "1234567890123456:YWxpY2U:1700000000:3.0.0:1:{}",
                B64.encode(bad)
            ));
            assert!(matches!(Spa::parse(&m), Err(FwknopError::Field(_))), "{bad}");
        }
    }
}
