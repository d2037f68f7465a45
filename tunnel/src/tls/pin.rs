//! Pinning a peer by SHA-256, with no CA involved.
//!
//! A pin is the SHA-256 of the peer's public key (its DER
//! SubjectPublicKeyInfo, as in HPKP), so a certificate renewed with the
//! same key still matches. Tokens and credentials issued before pins were
//! keys carry the SHA-256 of the whole certificate instead; both are
//! accepted, and the old kind holds until that certificate is renewed.

use std::{fmt, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::{TlsError, provider};

/// A SHA-256 pin: of a public key ([`Fingerprint::of_key`]), or of a whole
/// certificate ([`Fingerprint::of`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// SHA-256 over a certificate's DER bytes: changes with every renewal.
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(Sha256::digest(cert.as_ref()).into())
    }

    /// SHA-256 over the certificate's public key (DER SubjectPublicKeyInfo):
    /// the same across renewals that keep the key. None: not a certificate.
    pub fn of_key(cert: &CertificateDer<'_>) -> Option<Fingerprint> {
        let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
        Some(Fingerprint(
            Sha256::digest(parsed.subject_public_key_info().as_ref()).into(),
        ))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TlsError::Fingerprint(s.chars().take(100).collect());
        let digits: Vec<u8> = s
            .bytes()
            .filter(|b| *b != b':')
            .map(|b| (b as char).to_digit(16).map(|d| d as u8))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (b, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            *b = pair[0] << 4 | pair[1];
        }
        Ok(Fingerprint(out))
    }
}

/// The peer offered a key other than a pinned one: the wrong peer, or
/// someone in the middle. Retrying cannot help.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("the peer's {}, not {}: wrong peer, or a man in the middle", seen(.key, .certificate), pinned_list(.pinned))]
pub struct PinMismatch {
    /// The pin of the key the peer presented; None if its certificate
    /// could not be parsed.
    pub key: Option<Fingerprint>,
    /// The SHA-256 of the whole certificate it presented: what pins made
    /// before key pins, and a channel's peer files, hold.
    pub certificate: Fingerprint,
    pub pinned: Vec<Fingerprint>,
}

/// Both pins of what the peer presented, so either kind can be compared.
fn seen(key: &Option<Fingerprint>, certificate: &Fingerprint) -> String {
    match key {
        Some(key) => format!("public key pin is {key} (its certificate's SHA-256 {certificate})"),
        None => format!("certificate's SHA-256 is {certificate}"),
    }
}

fn pinned_list(pinned: &[Fingerprint]) -> String {
    match pinned {
        [one] => format!("the pinned {one}"),
        many => {
            let all: Vec<String> = many.iter().map(Fingerprint::to_string).collect();
            format!("any of the pinned {}", all.join(", "))
        }
    }
}

impl PinMismatch {
    /// The mismatch behind an I/O error from a TLS handshake, if that is
    /// what failed it.
    pub fn behind(e: &std::io::Error) -> Option<&PinMismatch> {
        match e.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner.downcast_ref(),
            _ => None,
        }
    }

    /// `e`, or, when it is a mismatch, an error that says so in words
    /// (rustls shows its custom errors only in debug form).
    pub fn explain(e: std::io::Error) -> std::io::Error {
        match PinMismatch::behind(&e) {
            Some(m) => std::io::Error::new(std::io::ErrorKind::InvalidData, m.clone()),
            None => e,
        }
    }
}

/// Accepts exactly the certificates whose key or whole certificate has
/// one of these pins, and checks
/// the handshake signature against the one presented, with the
/// algorithms of the provider the connection uses. Serves either side:
/// a client pinning its server, or a server pinning its clients.
#[derive(Debug)]
pub struct Pinned {
    pins: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    pub fn new(pin: Fingerprint) -> Pinned {
        Pinned::any_of(vec![pin], provider())
    }

    pub fn any_of(pins: Vec<Fingerprint>, provider: Arc<CryptoProvider>) -> Pinned {
        Pinned { pins, provider }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let key = Fingerprint::of_key(end_entity);
        let whole = Fingerprint::of(end_entity);
        if key.iter().chain([&whole]).any(|seen| self.pins.contains(seen)) {
            return Ok(());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
            Arc::new(PinMismatch {
                key,
                certificate: whole,
                pinned: self.pins.clone(),
            }),
        ))))
    }

    fn tls12(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Signature {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn tls13(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Signature {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
}

type Signature = Result<HandshakeSignatureValid, rustls::Error>;

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Signature {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Signature {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Signature {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Signature {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
