//! SM3 (GB/T 32905) as the suite's transcript hash, and HMAC-SM3, which
//! rustls turns into HKDF-SM3 for the TLS 1.3 key schedule.

use hmac::{Mac, SimpleHmac};
use rustls::crypto::{hash, hmac as rustls_hmac};
use sm3::{Digest, Sm3};

/// SM3's output, in bytes.
const OUTPUT_LEN: usize = 32;

/// TLS 1.2 never named SM3 in its HashAlgorithm registry; rustls wants a
/// value, and only compares it between suites, so ours is private.
const UNREGISTERED: u8 = 0xf3;

pub struct Sm3Hash;

impl hash::Hash for Sm3Hash {
    fn start(&self) -> Box<dyn hash::Context> {
        Box::new(Sm3Context(Sm3::new()))
    }

    fn hash(&self, data: &[u8]) -> hash::Output {
        hash::Output::new(&Sm3::digest(data))
    }

    fn output_len(&self) -> usize {
        OUTPUT_LEN
    }

    fn algorithm(&self) -> hash::HashAlgorithm {
        hash::HashAlgorithm::Unknown(UNREGISTERED)
    }
}

struct Sm3Context(Sm3);

impl hash::Context for Sm3Context {
    fn fork_finish(&self) -> hash::Output {
        hash::Output::new(&self.0.clone().finalize())
    }

    fn fork(&self) -> Box<dyn hash::Context> {
        Box::new(Sm3Context(self.0.clone()))
    }

    fn finish(self: Box<Self>) -> hash::Output {
        hash::Output::new(&self.0.finalize())
    }

    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
}

pub struct HmacSm3;

impl rustls_hmac::Hmac for HmacSm3 {
    fn with_key(&self, key: &[u8]) -> Box<dyn rustls_hmac::Key> {
        // HMAC takes keys of any length: this cannot fail.
        Box::new(HmacSm3Key(
            <SimpleHmac<Sm3> as Mac>::new_from_slice(key).expect("HMAC accepts any key length"),
        ))
    }

    fn hash_output_len(&self) -> usize {
        OUTPUT_LEN
    }
}

struct HmacSm3Key(SimpleHmac<Sm3>);

impl rustls_hmac::Key for HmacSm3Key {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> rustls_hmac::Tag {
        let mut mac = self.0.clone();
        mac.update(first);
        middle.iter().for_each(|m| mac.update(m));
        mac.update(last);
        rustls_hmac::Tag::new(&mac.finalize().into_bytes())
    }

    fn tag_len(&self) -> usize {
        OUTPUT_LEN
    }
}

#[cfg(test)]
mod tests {
    use hex_literal::hex;
    use rustls::crypto::{hash::Hash, hmac::Hmac};

    use super::*;

    /// GB/T 32905-2016, Appendix A, example 1.
    #[test]
    fn sm3_of_abc_is_the_standard_vector() {
        let out = Sm3Hash.hash(b"abc");
        assert_eq!(
            out.as_ref(),
            hex!("66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0")
        );
        let mut ctx = Sm3Hash.start();
        ctx.update(b"a");
        let forked = ctx.fork();
        ctx.update(b"bc");
        assert_eq!(ctx.fork_finish().as_ref(), out.as_ref());
        assert_ne!(forked.finish().as_ref(), out.as_ref());
    }

    /// HMAC-SM3 is RFC 2104 over SM3: the same key and message through the
    /// generic construction by hand give the same tag.
    #[test]
    fn hmac_sm3_is_rfc2104_over_sm3() {
        let key = b"key";
        let msg = b"The quick brown fox jumps over the lazy dog";
        let mut k = [0u8; 64];
        k[..key.len()].copy_from_slice(key);
        let inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).chain(msg.iter().copied()).collect();
        let inner = Sm3::digest(inner);
        let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(inner).collect();
        let expected = Sm3::digest(outer);
        let tag = HmacSm3
            .with_key(key)
            .sign_concat(b"The quick ", &[b"brown fox "], b"jumps over the lazy dog");
        assert_eq!(tag.as_ref(), expected.as_slice());
    }
}
