//! TLS 1.3 under the ShangMi suite of RFC 8998, as a rustls
//! [`CryptoProvider`]: record protection with SM4 in GCM
//! (TLS_SM4_GCM_SM3, 0x00C6) or CCM (TLS_SM4_CCM_SM3, 0x00C7), SM3 for the
//! transcript and HKDF, ephemeral ECDH over curveSM2 (0x0029), and
//! `sm2sig_sm3` (0x0708) signatures with the TLS 1.3 distinguishing ID.
//!
//! Stable rustls does not name these code points, so they travel as its
//! `Unknown` values: rustls compares them as numbers and puts them on the
//! wire unchanged, which is all a provider needs. The provider holds
//! nothing else: a connection under it can only ever negotiate the SM
//! suite.

mod aead;
mod certificate;
#[cfg(test)]
mod handshake;
mod hash;
mod kx;
mod sign;

use rustls::{
    CipherSuite, SupportedCipherSuite, Tls13CipherSuite,
    crypto::{
        CipherSuiteCommon, CryptoProvider, GetRandomFailed, SecureRandom, WebPkiSupportedAlgorithms,
        tls13::HkdfUsingHmac,
    },
};

pub use certificate::{CertificateError, self_signed};
pub use kx::CURVE_SM2;
pub use sign::{CERTIFICATE_ID, SM2SIG_SM3, Sm2Key, TLS13_ID};

/// TLS_SM4_GCM_SM3 in the TLS Cipher Suites registry.
pub const SM4_GCM_SM3: CipherSuite = CipherSuite::Unknown(0x00c6);
/// TLS_SM4_CCM_SM3 in the TLS Cipher Suites registry.
pub const SM4_CCM_SM3: CipherSuite = CipherSuite::Unknown(0x00c7);

/// SM4 has AES's block size, so AES-GCM's record limit of RFC 8446
/// section 5.5 applies unchanged; CCM's is half that (RFC 9147 4.5.3).
const GCM_RECORD_LIMIT: u64 = 1 << 24;
const CCM_RECORD_LIMIT: u64 = 1 << 23;

pub static TLS13_SM4_GCM_SM3: Tls13CipherSuite = Tls13CipherSuite {
    common: CipherSuiteCommon {
        suite: SM4_GCM_SM3,
        hash_provider: &hash::Sm3Hash,
        confidentiality_limit: GCM_RECORD_LIMIT,
    },
    hkdf_provider: &HkdfUsingHmac(&hash::HmacSm3),
    aead_alg: &aead::SM4_GCM,
    // QUIC's header protection is not defined for SM4.
    quic: None,
};

pub static TLS13_SM4_CCM_SM3: Tls13CipherSuite = Tls13CipherSuite {
    common: CipherSuiteCommon {
        suite: SM4_CCM_SM3,
        hash_provider: &hash::Sm3Hash,
        confidentiality_limit: CCM_RECORD_LIMIT,
    },
    hkdf_provider: &HkdfUsingHmac(&hash::HmacSm3),
    aead_alg: &aead::SM4_CCM,
    // QUIC's header protection is not defined for SM4.
    quic: None,
};

static SIGNATURES: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[&sign::Sm2Sm3Verify],
    mapping: &[(SM2SIG_SM3, &[&sign::Sm2Sm3Verify])],
};

/// Everything a rustls client or server needs to speak RFC 8998 and
/// nothing else, GCM preferred.
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: vec![
            SupportedCipherSuite::Tls13(&TLS13_SM4_GCM_SM3),
            SupportedCipherSuite::Tls13(&TLS13_SM4_CCM_SM3),
        ],
        kx_groups: vec![&kx::CurveSm2],
        signature_verification_algorithms: SIGNATURES,
        secure_random: &OsRandom,
        key_provider: &sign::Sm2Keys,
    }
}

#[derive(Debug)]
struct OsRandom;

impl SecureRandom for OsRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        use rand_core::RngCore;
        rand_core::OsRng.try_fill_bytes(buf).map_err(|_| GetRandomFailed)
    }
}
