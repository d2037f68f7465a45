//! What an ACME CA (RFC 8555) needs of a TLS server: a certificate signing
//! request for a key kept across renewals, so pins of that key hold, and
//! the TLS-ALPN-01 challenge certificate (RFC 8737), served on the
//! server's own port to a handshake that asks for [`ALPN`].

use std::sync::Arc;

use rustls::{
    pki_types::{PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

use super::{TlsError, provider};

/// The protocol name of a TLS-ALPN-01 validation handshake.
pub const ALPN: &[u8] = b"acme-tls/1";

/// A new ECDSA P-256 key, PEM (PKCS#8).
pub fn new_key() -> Result<String, TlsError> {
    Ok(rcgen::KeyPair::generate()?.serialize_pem())
}

/// A certificate signing request (DER) for `names` with the key in `key_pem`.
pub fn signing_request(names: &[String], key_pem: &str) -> Result<Vec<u8>, TlsError> {
    let key = rcgen::KeyPair::from_pem(key_pem)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    Ok(params.serialize_request(&key)?.der().to_vec())
}

/// The certificate that answers a TLS-ALPN-01 challenge for `domain`: it
/// names the domain alone and carries the SHA-256 of the key
/// authorization in the acmeIdentifier extension.
pub(super) fn challenge(domain: &str, key_authorization_sha256: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(key_authorization_sha256)];
    let cert = params.self_signed(&key)?;
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).map_err(|_| TlsError::Pem {
        what: "the challenge key",
    })?;
    // Not `CertifiedKey::from_der`: its check parses the certificate, and
    // the acmeIdentifier extension is critical, which rustls refuses.
    let signing = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)))
}
