//! Key exchange over curveSM2 (RFC 8998 section 3.2.1): ephemeral ECDH on
//! the SM2 curve, key shares as uncompressed points, the shared secret
//! the x coordinate, exactly as TLS 1.3 does for the NIST curves.

use elliptic_curve::{ecdh::EphemeralSecret, sec1::ToEncodedPoint};
use rand_core::OsRng;
use rustls::{
    Error, NamedGroup, PeerMisbehaved,
    crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup},
};
use sm2::{PublicKey, Sm2};

/// curveSM2's code point in the TLS Supported Groups registry.
pub const CURVE_SM2: NamedGroup = NamedGroup::Unknown(0x0029);

#[derive(Debug)]
pub struct CurveSm2;

impl SupportedKxGroup for CurveSm2 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let secret = EphemeralSecret::<Sm2>::random(&mut OsRng);
        let share = secret.public_key().to_encoded_point(false).as_bytes().to_vec();
        Ok(Box::new(Exchange { secret, share }))
    }

    fn name(&self) -> NamedGroup {
        CURVE_SM2
    }
}

struct Exchange {
    secret: EphemeralSecret<Sm2>,
    share: Vec<u8>,
}

impl ActiveKeyExchange for Exchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, Error> {
        // Only the uncompressed form is allowed (RFC 8446 section 4.2.8.2).
        if peer_pub_key.first() != Some(&0x04) {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let peer =
            PublicKey::from_sec1_bytes(peer_pub_key).map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
        let shared = self.secret.diffie_hellman(&peer);
        Ok(SharedSecret::from(shared.raw_secret_bytes().as_slice()))
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn group(&self) -> NamedGroup {
        CURVE_SM2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_secret_from_uncompressed_shares() {
        let a = CurveSm2.start().unwrap();
        let b = CurveSm2.start().unwrap();
        assert_eq!(a.pub_key().len(), 65);
        assert_eq!(a.pub_key()[0], 0x04);
        let (a_share, b_share) = (a.pub_key().to_vec(), b.pub_key().to_vec());
        let ab = a.complete(&b_share).unwrap();
        let ba = b.complete(&a_share).unwrap();
        assert_eq!(ab.secret_bytes(), ba.secret_bytes());
        assert_eq!(ab.secret_bytes().len(), 32);
    }

    #[test]
    fn malformed_or_compressed_shares_are_refused() {
        let mut share = CurveSm2.start().unwrap().pub_key().to_vec();
        let kx = || CurveSm2.start().unwrap();
        assert!(kx().complete(&share[..64]).is_err());
        assert!(kx().complete(&[]).is_err());
        let compressed = PublicKey::from_sec1_bytes(&share).unwrap().to_encoded_point(true);
        assert!(kx().complete(compressed.as_bytes()).is_err());
        share[64] ^= 1; // off the curve
        assert!(kx().complete(&share).is_err());
    }
}
