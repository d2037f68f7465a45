//! `sm2sig_sm3` (RFC 8998 section 3.2.2): SM2 signatures over SM3, DER
//! encoded as an ECDSA-style (r, s) pair. What tells this scheme apart from
//! plain ECDSA is the signer's distinguishing ID, which SM2 hashes into
//! every signature: in a TLS 1.3 CertificateVerify it must be
//! "TLSv1.3+GM+Cipher+Suite", while certificates keep the GM/T 0009
//! default "1234567812345678". Mixing the two up gives signatures that
//! only the same mistaken implementation accepts.

use std::sync::Arc;

use der::{Decode, Encode, Sequence, asn1::UintRef};
use rand_core::OsRng;
use rustls::{
    Error, SignatureAlgorithm, SignatureScheme,
    crypto::KeyProvider,
    pki_types::{AlgorithmIdentifier, InvalidSignature, PrivateKeyDer, SignatureVerificationAlgorithm},
    sign::{Signer, SigningKey},
};
use sm2::{
    SecretKey,
    dsa::{Signature, SigningKey as Sm2SigningKey, VerifyingKey},
    elliptic_curve::{FieldBytes, generic_array::typenum::Unsigned},
    pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding},
};

/// `sm2sig_sm3` in the TLS SignatureScheme registry.
pub const SM2SIG_SM3: SignatureScheme = SignatureScheme::Unknown(0x0708);

/// The distinguishing ID of a TLS 1.3 CertificateVerify (RFC 8998 3.2.2).
pub const TLS13_ID: &str = "TLSv1.3+GM+Cipher+Suite";

/// The distinguishing ID certificates are signed with (GM/T 0009).
pub const CERTIFICATE_ID: &str = "1234567812345678";

/// The content of the AlgorithmIdentifier of an SM2 public key:
/// id-ecPublicKey with the curve parameter 1.2.156.10197.1.301.
const SM2_PUBLIC_KEY: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // 1.2.840.10045.2.1
    0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x82, 0x2d, // 1.2.156.10197.1.301
];

/// The content of the AlgorithmIdentifier SM2-with-SM3, 1.2.156.10197.1.501.
pub(crate) const SM2_WITH_SM3: &[u8] = &[0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x83, 0x75];

#[derive(Sequence)]
struct SignatureValue<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

/// SM2 (r, s) as the DER SEQUENCE TLS and X.509 carry.
fn to_der(signature: &Signature) -> Vec<u8> {
    let (r, s) = (signature.r_bytes(), signature.s_bytes());
    let value = SignatureValue {
        r: UintRef::new(&r).expect("a 32-byte scalar is a valid INTEGER"),
        s: UintRef::new(&s).expect("a 32-byte scalar is a valid INTEGER"),
    };
    value.to_der().expect("two INTEGERs always encode")
}

fn from_der(bytes: &[u8]) -> Option<Signature> {
    let value = SignatureValue::from_der(bytes).ok()?;
    let width = <sm2::elliptic_curve::FieldBytesSize<sm2::Sm2> as Unsigned>::USIZE;
    let pad = |int: UintRef<'_>| -> Option<FieldBytes<sm2::Sm2>> {
        let digits = int.as_bytes();
        let mut out = FieldBytes::<sm2::Sm2>::default();
        out.get_mut(width.checked_sub(digits.len())?..)?.copy_from_slice(digits);
        Some(out)
    };
    Signature::from_scalars(pad(value.r)?, pad(value.s)?).ok()
}

/// An SM2 private key: a device's identity under the `sm` policy.
#[derive(Clone)]
pub struct Sm2Key(SecretKey);

impl Sm2Key {
    pub fn generate() -> Sm2Key {
        Sm2Key(SecretKey::random(&mut OsRng))
    }

    /// Reads a PKCS#8 or SEC1 (`EC PRIVATE KEY`) DER key.
    pub fn from_der(key: &PrivateKeyDer<'_>) -> Result<Sm2Key, Error> {
        let parsed = match key {
            PrivateKeyDer::Pkcs8(der) => SecretKey::from_pkcs8_der(der.secret_pkcs8_der()).ok(),
            PrivateKeyDer::Sec1(der) => SecretKey::from_sec1_der(der.secret_sec1_der()).ok(),
            _ => None,
        };
        parsed
            .map(Sm2Key)
            .ok_or_else(|| Error::General("the private key is not an SM2 key in PKCS#8 or SEC1 form".into()))
    }

    pub fn to_pkcs8_pem(&self) -> String {
        self.0
            .to_pkcs8_pem(LineEnding::LF)
            .expect("an SM2 key always encodes")
            .to_string()
    }

    /// The DER SubjectPublicKeyInfo, as a certificate carries it.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.0
            .public_key()
            .to_public_key_der()
            .expect("an SM2 public key always encodes")
            .into_vec()
    }

    /// A DER signature over `message` under distinguishing ID `id`.
    pub fn sign(&self, id: &str, message: &[u8]) -> Result<Vec<u8>, Error> {
        use sm2::dsa::signature::Signer as _;
        let key = Sm2SigningKey::new(id, &self.0).map_err(|_| Error::General("SM2 signing key".into()))?;
        let signature: Signature = key
            .try_sign(message)
            .map_err(|_| Error::General("SM2 signing failed".into()))?;
        Ok(to_der(&signature))
    }
}

impl std::fmt::Debug for Sm2Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sm2Key(..)")
    }
}

impl SigningKey for Sm2Key {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SM2SIG_SM3)
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    /// TLS 1.2's algorithm registry has no SM2; an SM2 key is an EC key
    /// (id-ecPublicKey), and rustls only asks this of TLS 1.2 suites,
    /// which the SM provider has none of.
    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

impl Signer for Sm2Key {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        Sm2Key::sign(self, TLS13_ID, message)
    }

    fn scheme(&self) -> SignatureScheme {
        SM2SIG_SM3
    }
}

/// Loads SM2 keys for certificates presented in a handshake.
#[derive(Debug)]
pub struct Sm2Keys;

impl KeyProvider for Sm2Keys {
    fn load_private_key(&self, key_der: PrivateKeyDer<'static>) -> Result<Arc<dyn SigningKey>, Error> {
        Ok(Arc::new(Sm2Key::from_der(&key_der)?))
    }
}

/// Checks a peer's CertificateVerify under `sm2sig_sm3`.
#[derive(Debug)]
pub struct Sm2Sm3Verify;

impl SignatureVerificationAlgorithm for Sm2Sm3Verify {
    fn verify_signature(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), InvalidSignature> {
        use sm2::dsa::signature::Verifier as _;
        let key = VerifyingKey::from_sec1_bytes(TLS13_ID, public_key).map_err(|_| InvalidSignature)?;
        let signature = from_der(signature).ok_or(InvalidSignature)?;
        key.verify(message, &signature).map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        AlgorithmIdentifier::from_slice(SM2_PUBLIC_KEY)
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        AlgorithmIdentifier::from_slice(SM2_WITH_SM3)
    }
}

#[cfg(test)]
mod tests {
    use hex_literal::hex;
    use sm2::elliptic_curve::sec1::ToEncodedPoint;

    use super::*;

    fn point(key: &Sm2Key) -> Vec<u8> {
        key.0.public_key().to_encoded_point(false).as_bytes().to_vec()
    }

    #[test]
    fn certificate_verify_signatures_use_the_tls13_id() {
        let key = Sm2Key::generate();
        let msg = b"transcript";
        let tls = Signer::sign(&key, msg).unwrap();
        assert!(Sm2Sm3Verify.verify_signature(&point(&key), msg, &tls).is_ok());
        assert!(Sm2Sm3Verify.verify_signature(&point(&key), b"other", &tls).is_err());
        // The same key under the certificate ID is not a valid TLS 1.3 signature.
        let default_id = key.sign(CERTIFICATE_ID, msg).unwrap();
        assert!(Sm2Sm3Verify.verify_signature(&point(&key), msg, &default_id).is_err());
    }

    #[test]
    fn signatures_are_der_and_bad_encodings_are_refused() {
        let key = Sm2Key::generate();
        let sig = Signer::sign(&key, b"m").unwrap();
        assert_eq!(sig[0], 0x30, "a DER SEQUENCE");
        assert!(from_der(&sig).is_some());
        assert!(from_der(&sig[..sig.len() - 1]).is_none());
        assert!(from_der(&[0x30, 0x00]).is_none());
        // An INTEGER wider than the curve's field.
        let wide = SignatureValue {
            r: UintRef::new(&[1; 33]).unwrap(),
            s: UintRef::new(&[1]).unwrap(),
        };
        assert!(from_der(&wide.to_der().unwrap()).is_none());
    }

    /// GB/T 32918.5-2017 Annex A: the published public key, signature (r, s)
    /// and message "message digest" under ID "1234567812345678".
    #[test]
    fn verifies_the_standards_published_signature() {
        let public = hex!(
            "04"
            "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
            "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13"
        );
        let r = hex!("F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3");
        let s = hex!("B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA");
        use sm2::dsa::signature::Verifier as _;
        let key = VerifyingKey::from_sec1_bytes(CERTIFICATE_ID, &public).unwrap();
        let signature = Signature::from_scalars(r, s).unwrap();
        assert!(key.verify(b"message digest", &signature).is_ok());
        assert_eq!(from_der(&to_der(&signature)), Some(signature));
    }

    #[test]
    fn keys_round_trip_through_pkcs8() {
        let key = Sm2Key::generate();
        let pem = key.to_pkcs8_pem();
        let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes());
        use rustls::pki_types::pem::PemObject;
        let back = Sm2Key::from_der(&der.unwrap()).unwrap();
        assert_eq!(back.public_key_der(), key.public_key_der());
        assert!(Sm2Key::from_der(&PrivateKeyDer::Pkcs8(vec![0u8; 10].into())).is_err());
    }
}
