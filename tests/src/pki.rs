//! A certificate authority of a test's own, for the peers that need one:
//! a Redis over TLS, an ACME server's API, a relay client's certificate.

use anyhow::Result;

/// A self-signed CA and its key.
pub struct LabCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A certificate the CA issued, and its key, PEM.
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl LabCa {
    /// A CA named `name`: a name of its own, since a leaf named like its
    /// issuer reads as self-signed.
    pub fn new(name: &str) -> Result<LabCa> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ok(LabCa {
            cert: params.self_signed(&key)?,
            key,
        })
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate named `name`, for `sans`, with `usages` (none: any).
    pub fn issue(
        &self,
        name: &str,
        sans: Vec<rcgen::SanType>,
        usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> Result<Issued> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.subject_alt_names = sans;
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}
