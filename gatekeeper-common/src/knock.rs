//! The part of the knock wire format the XDP program needs: how to recognise
//! a knock and which lengths are plausible. The full format lives in the
//! daemon's knock module.

/// Version prefix of knock packet v1 at the start of the L4 payload.
pub const PREFIX: [u8; 3] = [0x80, 0x86, 0x01];

/// Prefix (3) + key id (16) + AEAD tag (16) + nonce (24): a knock with an
/// empty plaintext. Anything shorter cannot be a knock.
pub const MIN_LEN: usize = 3 + 16 + 16 + 24;

/// Largest knock the XDP program copies to the daemon. A power of two so the
/// verifier can bound the copy with a mask.
pub const MAX_LEN: usize = 1024;

/// Whether a payload of `len` bytes is within the knock length bounds.
pub const fn plausible_len(len: usize) -> bool {
    len >= MIN_LEN && len <= MAX_LEN
}

/// The shortest packet fwknop's client sends (fwknopd's `MIN_SPA_DATA_SIZE`).
/// It has no binary prefix: base64 text on the knock port. The longest the
/// program hands over is [`MAX_LEN`].
pub const FWKNOP_MIN_LEN: usize = 140;

/// Whether an fwknop packet of `len` bytes is within the bounds.
pub const fn plausible_fwknop_len(len: usize) -> bool {
    len >= FWKNOP_MIN_LEN && len <= MAX_LEN
}

/// Whether `b` is a character of fwknop's base64 (no padding is sent).
pub const fn base64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

/// Version prefix of knock packet v2 (`docs/knock-v2.md`), which carries
/// no key id: an ephemeral X25519 key, a flood tag, the client's key
/// sealed to the gateway, the sealed payload and the nonce.
pub const PREFIX_V2: [u8; 3] = [0x80, 0x86, 0x02];

/// Where v2's ephemeral public key and its flood tag start.
pub const V2_EPHEMERAL_AT: usize = 3;
pub const V2_TAG_AT: usize = 35;

/// Prefix (3) + ephemeral key (32) + flood tag (8) + sealed client key
/// (32 + 16) + AEAD tag of an empty payload (16) + nonce (24).
pub const V2_MIN_LEN: usize = 3 + 32 + 8 + 48 + 16 + 24;

/// Whether a v2 knock of `len` bytes is within the bounds.
pub const fn plausible_v2_len(len: usize) -> bool {
    len >= V2_MIN_LEN && len <= MAX_LEN
}

/// A v2 knock's flood tag: SipHash-2-4 under a key every enrolled device
/// derives from the gateway's public knock key, over the knock's
/// ephemeral public key and then its nonce (56 bytes, read as seven
/// little-endian words). It tells the gate that some enrolled device made
/// the knock, not which one. Written out here because the XDP program
/// computes it too; the tests check it against the `siphasher` crate.
#[inline(always)]
pub fn flood_tag(key: [u64; 2], words: &[u64; 7]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    for &m in words {
        v[3] ^= m;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= m;
    }
    // The last block: the length (56) in the top byte, no bytes left over.
    let last = 56u64 << 56;
    v[3] ^= last;
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^= last;
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// The ephemeral key (32 bytes) and nonce (24) as the seven words
/// [`flood_tag`] reads.
#[inline(always)]
pub fn tag_words(ephemeral: &[u8; 32], nonce: &[u8; 24]) -> [u64; 7] {
    let word = |b: &[u8], i: usize| {
        u64::from_le_bytes([
            b[i],
            b[i + 1],
            b[i + 2],
            b[i + 3],
            b[i + 4],
            b[i + 5],
            b[i + 6],
            b[i + 7],
        ])
    };
    [
        word(ephemeral, 0),
        word(ephemeral, 8),
        word(ephemeral, 16),
        word(ephemeral, 24),
        word(nonce, 0),
        word(nonce, 8),
        word(nonce, 16),
    ]
}

#[cfg(test)]
mod tests {
    use core::hash::Hasher;

    use super::*;

    #[test]
    fn the_flood_tag_is_siphash_2_4() {
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let ephemeral: [u8; 32] = core::array::from_fn(|i| (i * 7 + 1) as u8);
        let nonce: [u8; 24] = core::array::from_fn(|i| (200 - i) as u8);
        let mut reference = siphasher::sip::SipHasher24::new_with_key(&key);
        reference.write(&ephemeral);
        reference.write(&nonce);
        let k = [
            u64::from_le_bytes(key[..8].try_into().unwrap()),
            u64::from_le_bytes(key[8..].try_into().unwrap()),
        ];
        assert_eq!(flood_tag(k, &tag_words(&ephemeral, &nonce)), reference.finish());
    }
}
