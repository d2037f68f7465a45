//! Self-signed SM2 certificates: what a device presents when its peers pin
//! its key rather than trust a CA. The signature over the certificate uses
//! the GM/T 0009 default ID, as every SM2 certificate does; only the
//! handshake's CertificateVerify uses the TLS 1.3 one.

use std::{str::FromStr, time::Duration};

use der::{Decode, Encode, asn1::BitString};
use rand_core::{OsRng, RngCore};
use rustls::pki_types::CertificateDer;
use x509_cert::{
    Certificate, TbsCertificate, Version, name::Name, serial_number::SerialNumber, spki::AlgorithmIdentifierOwned,
    spki::SubjectPublicKeyInfoOwned, time::Validity,
};

use crate::sign::{CERTIFICATE_ID, SM2_WITH_SM3, Sm2Key};

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("certificate name {0:?}: use letters, digits, '.', '-' and '_' only")]
    Name(String),
    #[error("encoding the certificate")]
    Encode(#[from] der::Error),
    #[error("signing the certificate")]
    Sign(#[from] rustls::Error),
}

/// A certificate for `key`, named `common_name`, signed by itself, valid
/// from now for `lifetime`.
pub fn self_signed(
    key: &Sm2Key,
    common_name: &str,
    lifetime: Duration,
) -> Result<CertificateDer<'static>, CertificateError> {
    let plain = !common_name.is_empty()
        && common_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !plain {
        return Err(CertificateError::Name(common_name.chars().take(64).collect()));
    }
    let name = Name::from_str(&format!("CN={common_name}"))?;
    let mut serial = [0u8; 16];
    OsRng.fill_bytes(&mut serial);
    serial[0] &= 0x7f; // positive, as RFC 5280 requires
    let algorithm =
        AlgorithmIdentifierOwned::from_der(&[&[0x30, SM2_WITH_SM3.len() as u8][..], SM2_WITH_SM3].concat())?;
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: SerialNumber::new(&serial)?,
        signature: algorithm.clone(),
        issuer: name.clone(),
        validity: Validity::from_now(lifetime)?,
        subject: name,
        subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(&key.public_key_der())?,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: None,
    };
    let signature = key.sign(CERTIFICATE_ID, &tbs.to_der()?)?;
    let certificate = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: algorithm,
        signature: BitString::from_bytes(&signature)?,
    };
    Ok(CertificateDer::from(certificate.to_der()?))
}
