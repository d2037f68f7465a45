//! What a certificate says, for `gatekeeper status` and for deciding when
//! to renew it.

use rustls::pki_types::CertificateDer;
use x509_cert::{Certificate, der::Decode};

use super::TlsError;

/// The subject the gateway's certificates had before they named the
/// gateway: one scan for it found every gateway, so it is renewed away.
const OLD_DEFAULT_SUBJECT: &str = "CN=rcgen self signed cert";

/// The parts of a certificate an operator checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// RFC 4514 form, `CN=gw.example.org`.
    pub subject: String,
    pub issuer: String,
    /// Hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
}

impl Summary {
    pub fn of(cert: &CertificateDer<'_>) -> Result<Summary, TlsError> {
        let cert = Certificate::from_der(cert.as_ref()).map_err(|e| TlsError::Parse(e.to_string()))?;
        let tbs = &cert.tbs_certificate;
        let serial = tbs
            .serial_number
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Summary {
            subject: tbs.subject.to_string(),
            issuer: tbs.issuer.to_string(),
            serial,
            not_before: tbs.validity.not_before.to_unix_duration().as_secs(),
            not_after: tbs.validity.not_after.to_unix_duration().as_secs(),
        })
    }

    pub fn self_signed(&self) -> bool {
        self.subject == self.issuer
    }

    /// Made by an earlier release, valid 1975-4096 under a fixed subject.
    pub fn old_default(&self) -> bool {
        self.subject == OLD_DEFAULT_SUBJECT
    }

    /// When the gateway renews this certificate itself: one it made (not
    /// a CA's, and not an earlier release's, which identifies the product).
    pub fn self_renewal(&self) -> Option<u64> {
        (self.self_signed() && !self.old_default()).then(|| self.renew_at())
    }

    /// When a certificate the gateway made for itself is due for renewal:
    /// two thirds into its validity, as ACME clients do, which leaves a
    /// third of it to retry in.
    pub fn renew_at(&self) -> u64 {
        let lifetime = self.not_after.saturating_sub(self.not_before);
        self.not_before + lifetime / 3 * 2
    }
}
