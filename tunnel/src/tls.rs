//! TLS without a CA: the gateway generates its own certificate on first
//! start, and the agent accepts exactly the certificate whose SHA-256
//! fingerprint its token carries. The handshake signature is still checked
//! against that certificate's key, so pinning the fingerprint pins the key.

use std::{fmt, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("generating the gateway certificate")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration")]
    Config(#[from] rustls::Error),
    #[error("bad certificate fingerprint {0:?}: expected 64 hex digits (SHA-256)")]
    Fingerprint(String),
    #[error("bad PEM in {what}")]
    Pem { what: &'static str },
}

/// SHA-256 over a certificate's DER bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(Sha256::digest(cert.as_ref()).into())
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

/// The peer offered a certificate other than a pinned one: the wrong
/// peer, or someone in the middle. Retrying cannot help.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("the peer's certificate fingerprint is {seen}, not {}: wrong peer, or a man in the middle", pinned_list(.pinned))]
pub struct PinMismatch {
    pub seen: Fingerprint,
    pub pinned: Vec<Fingerprint>,
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

/// The gateway's certificate (with any chain after it) and private key.
pub struct Identity {
    /// The leaf certificate first.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl Identity {
    /// A fresh self-signed certificate for `names` (its SANs).
    pub fn generate(names: &[String]) -> Result<Identity, TlsError> {
        let certified = rcgen::generate_simple_self_signed(names.to_vec())?;
        Identity::from_pem(&certified.cert.pem(), &certified.key_pair.serialize_pem())
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.chain[0])
    }

    /// The certificate and key as PEM, for keeping in the state directory.
    pub fn to_pem(&self) -> (&str, &str) {
        (&self.cert_pem, &self.key_pem)
    }

    /// Reads back what [`Identity::to_pem`] gave, or an operator's
    /// certificate chain (leaf first) and key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert: &str, key: &str) -> Result<Identity, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or(TlsError::Pem {
                what: "the certificate",
            })?;
        Ok(Identity {
            chain,
            key: PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|_| TlsError::Pem {
                what: "the private key",
            })?,
            cert_pem: cert.to_string(),
            key_pem: key.to_string(),
        })
    }

    /// The gateway's side of the handshake.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's (and portal client's) side: trust exactly the certificate
/// with `pin`.
pub fn client_config(pin: Fingerprint) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned::new(pin)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts exactly the certificates with these fingerprints, and checks
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
        let seen = Fingerprint::of(end_entity);
        if self.pins.contains(&seen) {
            return Ok(());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
            Arc::new(PinMismatch {
                seen,
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

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// Handshakes with a real rustls server on loopback; returns what the
    /// server echoed, or the client's error.
    async fn handshake(server: &Identity, pin: Fingerprint) -> Result<Vec<u8>, String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server.server_config().unwrap());
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let mut buf = [0u8; 5];
                if tls.read_exact(&mut buf).await.is_ok() {
                    let _ = tls.write_all(&buf).await;
                }
            }
        });
        let connector = TlsConnector::from(client_config(pin).unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("gateway").unwrap();
        let result = async {
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| PinMismatch::explain(e).to_string())?;
            tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok(buf.to_vec())
        }
        .await;
        srv.abort();
        result
    }

    #[tokio::test]
    async fn the_pinned_certificate_is_accepted_and_any_other_refused() {
        let gateway = Identity::generate(&["gateway".into()]).unwrap();
        let impostor = Identity::generate(&["gateway".into()]).unwrap();
        assert_eq!(handshake(&gateway, gateway.fingerprint()).await, Ok(b"hello".to_vec()));
        let refused = handshake(&impostor, gateway.fingerprint()).await.unwrap_err();
        assert!(refused.contains("fingerprint"), "{refused}");
    }

    #[tokio::test]
    async fn a_mismatch_is_recognised_by_its_type() {
        let gateway = Identity::generate(&["gateway".into()]).unwrap();
        let impostor = Identity::generate(&["gateway".into()]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(impostor.server_config().unwrap());
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let e = TlsConnector::from(client_config(gateway.fingerprint()).unwrap())
            .connect(ServerName::try_from("gateway").unwrap(), tcp)
            .await
            .map(|_| ())
            .unwrap_err();
        let mismatch = PinMismatch::behind(&e).expect("the verifier's refusal");
        assert_eq!(
            (mismatch.seen, mismatch.pinned.clone()),
            (impostor.fingerprint(), vec![gateway.fingerprint()])
        );
        assert!(PinMismatch::behind(&std::io::Error::other("elsewhere")).is_none());
        srv.abort();
    }

    #[test]
    fn identities_round_trip_through_pem_and_fingerprints_through_text() {
        let id = Identity::generate(&["gw.example".into()]).unwrap();
        let (cert, key) = id.to_pem();
        let back = Identity::from_pem(cert, key).unwrap();
        assert_eq!(back.fingerprint(), id.fingerprint());
        assert!(back.server_config().is_ok(), "the key still matches the certificate");
        let text = id.fingerprint().to_string();
        assert_eq!(text.parse::<Fingerprint>().unwrap(), id.fingerprint());
        assert!("abcd".parse::<Fingerprint>().is_err());
        // 64 bytes, but not 64 hex digits: refused, never a panic.
        let wide = "é".repeat(32);
        assert_eq!(wide.len(), 64);
        assert!(wide.parse::<Fingerprint>().is_err());
        assert!(format!("{}é", &text[..62]).parse::<Fingerprint>().is_err());
        let colons: String = text
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), id.fingerprint());
        assert!(Identity::from_pem("nope", key).is_err());
    }
}
