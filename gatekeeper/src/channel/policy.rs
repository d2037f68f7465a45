//! Cipher policies: which TLS 1.3 suites, groups and signatures a channel
//! may negotiate, each a rustls provider holding nothing else, so a
//! connection can only ever meet its channel's policy or fail.

use std::sync::Arc;

use rustls::{
    CipherSuite, ClientConfig, ServerConfig, SupportedCipherSuite,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer},
    version::TLS13,
};
use serde::Deserialize;
use tunnel::tls::{Fingerprint, Pinned};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// RFC 8998: TLS_SM4_GCM_SM3 or TLS_SM4_CCM_SM3, curveSM2, SM2 keys.
    Sm,
    /// TLS_AES_256_GCM_SHA384 or TLS_AES_128_GCM_SHA256, ECDSA P-256 keys.
    Tls13Aes,
    /// TLS_CHACHA20_POLY1305_SHA256, ECDSA P-256 keys.
    Tls13Chacha,
}

/// The kind of key a device presents under a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Sm2,
    Ecdsa,
}

impl KeyKind {
    pub fn label(self) -> &'static str {
        match self {
            KeyKind::Sm2 => "sm2",
            KeyKind::Ecdsa => "ecdsa",
        }
    }
}

impl Policy {
    pub fn label(self) -> &'static str {
        match self {
            Policy::Sm => "sm",
            Policy::Tls13Aes => "tls13-aes",
            Policy::Tls13Chacha => "tls13-chacha",
        }
    }

    pub fn key_kind(self) -> KeyKind {
        match self {
            Policy::Sm => KeyKind::Sm2,
            Policy::Tls13Aes | Policy::Tls13Chacha => KeyKind::Ecdsa,
        }
    }

    pub fn provider(self) -> Arc<CryptoProvider> {
        let provider = match self {
            Policy::Sm => shangmi::provider(),
            Policy::Tls13Aes => only(&[
                ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ]),
            Policy::Tls13Chacha => only(&[ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256]),
        };
        Arc::new(provider)
    }

    /// The client side: present `identity`, accept a server whose
    /// certificate is one of `pins`.
    pub fn client_config(
        self,
        identity: &Identity,
        pins: Vec<Fingerprint>,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let provider = self.provider();
        let config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned::any_of(pins, provider)))
            .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// The server side: present `identity`, require a client certificate
    /// that is one of `pins`.
    pub fn server_config(
        self,
        identity: &Identity,
        pins: Vec<Fingerprint>,
    ) -> Result<Arc<ServerConfig>, rustls::Error> {
        let provider = self.provider();
        let config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&TLS13])?
            .with_client_cert_verifier(Arc::new(Pinned::any_of(pins, provider)))
            .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// ring's provider cut down to `suites`.
fn only(suites: &[SupportedCipherSuite]) -> CryptoProvider {
    CryptoProvider {
        cipher_suites: suites.to_vec(),
        ..ring::default_provider()
    }
}

/// A certificate and its private key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

/// A suite's registry name, the SM ones included (rustls names them
/// `Unknown`).
pub fn suite_name(suite: CipherSuite) -> String {
    match suite {
        shangmi::SM4_GCM_SM3 => "TLS_SM4_GCM_SM3".into(),
        shangmi::SM4_CCM_SM3 => "TLS_SM4_CCM_SM3".into(),
        other => match format!("{other:?}") {
            named if named.starts_with("TLS") => named.replace("TLS13_", "TLS_"),
            _ => format!("0x{:04x}", u16::from(other)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_policy_holds_its_own_suites_only() {
        let suites = |p: Policy| -> Vec<String> {
            p.provider()
                .cipher_suites
                .iter()
                .map(|s| suite_name(s.suite()))
                .collect()
        };
        assert_eq!(suites(Policy::Sm), ["TLS_SM4_GCM_SM3", "TLS_SM4_CCM_SM3"]);
        assert_eq!(
            suites(Policy::Tls13Aes),
            ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]
        );
        assert_eq!(suites(Policy::Tls13Chacha), ["TLS_CHACHA20_POLY1305_SHA256"]);
        assert_eq!(
            Policy::Sm
                .provider()
                .kx_groups
                .iter()
                .map(|g| g.name())
                .collect::<Vec<_>>(),
            [shangmi::CURVE_SM2]
        );
    }

    #[test]
    fn suites_are_named_as_the_registry_names_them() {
        assert_eq!(suite_name(shangmi::SM4_GCM_SM3), "TLS_SM4_GCM_SM3");
        assert_eq!(
            suite_name(CipherSuite::TLS13_AES_128_GCM_SHA256),
            "TLS_AES_128_GCM_SHA256"
        );
        assert_eq!(suite_name(CipherSuite::Unknown(0x1234)), "0x1234");
        assert_eq!(suite_name(CipherSuite::from(0x009f)), "0x009f");
    }
}
