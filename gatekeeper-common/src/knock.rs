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
