//! TLS without a CA: the gateway makes its own certificate, and agents and
//! devices accept exactly the key whose SHA-256 pin their token or
//! credential carries. The handshake signature is still checked against
//! the presented certificate's key, so pinning the key pins the peer.
//!
//! - [`pin`]: pins and the verifier that checks them, on either side.
//! - [`summary`]: what a certificate says, and when to renew it.
//! - [`LiveCertificate`]: a listener's certificate, replaced while it serves.
//! - [`acme`]: what an ACME CA needs of the listener.

pub mod acme;
mod pin;
mod summary;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use thiserror::Error;

pub use pin::{Fingerprint, PinMismatch, Pinned};
pub use summary::Summary;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("making the certificate")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration")]
    Config(#[from] rustls::Error),
    #[error("bad certificate fingerprint {0:?}: expected 64 hex digits (SHA-256)")]
    Fingerprint(String),
    #[error("bad PEM in {what}")]
    Pem { what: &'static str },
    #[error("the certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("the OS's random source failed")]
    Random,
}

/// How long a certificate the gateway makes for itself is valid: about a
/// year, like an ordinary server's, and renewed before it ends.
pub const SELF_SIGNED_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// A certificate (with any chain after it) and its private key.
pub struct Identity {
    /// The leaf certificate first.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The pin of the leaf's public key.
    pin: Fingerprint,
    cert_pem: String,
    key_pem: String,
}

impl Identity {
    /// A fresh key and a self-signed certificate for `names`: the first is
    /// the subject's common name, all are its SANs (DNS names or
    /// addresses). Nothing in it names the product.
    pub fn generate(names: &[String]) -> Result<Identity, TlsError> {
        Identity::self_signed(names, rcgen::KeyPair::generate()?)
    }

    /// A new self-signed certificate for `names` with this identity's key,
    /// valid from now: every pin of the key still matches.
    pub fn reissue(&self, names: &[String]) -> Result<Identity, TlsError> {
        Identity::with_key(names, &self.key_pem)
    }

    /// A self-signed certificate for `names` with the key in `key_pem`:
    /// what a listener serves until a CA issues one for that key.
    pub fn with_key(names: &[String], key_pem: &str) -> Result<Identity, TlsError> {
        Identity::self_signed(names, rcgen::KeyPair::from_pem(key_pem)?)
    }

    fn self_signed(names: &[String], key: rcgen::KeyPair) -> Result<Identity, TlsError> {
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        let mut subject = rcgen::DistinguishedName::new();
        if let Some(first) = names.first() {
            subject.push(rcgen::DnType::CommonName, first.as_str());
        }
        params.distinguished_name = subject;
        let now = time::OffsetDateTime::now_utc();
        // An hour back, for peers whose clocks run a little behind.
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + SELF_SIGNED_LIFETIME;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()?));
        let cert = params.self_signed(&key)?;
        Identity::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// The pin of the certificate's public key: what tokens and
    /// credentials carry, unchanged by [`Identity::reissue`].
    pub fn pin(&self) -> Fingerprint {
        self.pin
    }

    /// The SHA-256 of the whole leaf certificate: changes with every renewal.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.chain[0])
    }

    /// Whether the leaf certificate is valid for each of `names`.
    pub fn covers(&self, names: &[String]) -> bool {
        let Ok(leaf) = webpki::EndEntityCert::try_from(&self.chain[0]) else {
            return false;
        };
        names.iter().all(|name| {
            rustls::pki_types::ServerName::try_from(name.as_str())
                .is_ok_and(|name| leaf.verify_is_valid_for_subject_name(&name).is_ok())
        })
    }

    /// What the leaf certificate says.
    pub fn summary(&self) -> Result<Summary, TlsError> {
        Summary::of(&self.chain[0])
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
        let pin = Fingerprint::of_key(&chain[0]).ok_or(TlsError::Pem {
            what: "the certificate (not an X.509 certificate)",
        })?;
        Ok(Identity {
            chain,
            key: PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|_| TlsError::Pem {
                what: "the private key",
            })?,
            pin,
            cert_pem: cert.to_string(),
            key_pem: key.to_string(),
        })
    }

    fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let key = CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), &provider())?;
        Ok(Arc::new(key))
    }

    /// A server's side of the handshake with this certificate, fixed.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        Ok(Arc::new(LiveCertificate::new(self)?.server_config()?))
    }
}

/// A serial of 16 random bytes, positive, as CAs use: two certificates
/// for the same key never share one.
fn random_serial() -> Result<[u8; 16], TlsError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut serial = [0u8; 16];
    SystemRandom::new().fill(&mut serial).map_err(|_| TlsError::Random)?;
    // Positive, and 16 bytes long in DER whatever the draw.
    serial[0] = serial[0] & 0x7f | 0x40;
    Ok(serial)
}

/// The certificate a listener serves, replaceable while it serves:
/// sessions already up keep theirs, the next handshake gets the new one.
/// While an ACME CA validates a name, a handshake for that name asking for
/// [`acme::ALPN`] gets the challenge certificate instead.
#[derive(Debug)]
pub struct LiveCertificate {
    current: RwLock<Arc<CertifiedKey>>,
    /// Pending TLS-ALPN-01 challenges, by domain.
    challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl LiveCertificate {
    pub fn new(identity: &Identity) -> Result<Arc<LiveCertificate>, TlsError> {
        Ok(Arc::new(LiveCertificate {
            current: RwLock::new(identity.certified_key()?),
            challenges: RwLock::new(HashMap::new()),
        }))
    }

    /// Answers the CA's TLS-ALPN-01 validation of `domain` until
    /// [`LiveCertificate::end_challenge`].
    pub fn answer_challenge(&self, domain: &str, key_authorization_sha256: &[u8]) -> Result<(), TlsError> {
        let cert = acme::challenge(domain, key_authorization_sha256)?;
        let mut challenges = self.challenges.write().unwrap_or_else(|e| e.into_inner());
        challenges.insert(domain.to_ascii_lowercase(), cert);
        Ok(())
    }

    pub fn end_challenge(&self, domain: &str) {
        let mut challenges = self.challenges.write().unwrap_or_else(|e| e.into_inner());
        challenges.remove(&domain.to_ascii_lowercase());
    }

    /// Serves `identity` from the next handshake on. Refused, with the old
    /// one kept, if its key does not match its certificate.
    pub fn replace(&self, identity: &Identity) -> Result<(), TlsError> {
        let next = identity.certified_key()?;
        next.keys_match()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// A server config serving this certificate. The server's cipher
    /// order wins over the client's, so a client that prefers a weaker
    /// suite still gets the strongest both support.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.ignore_client_order = true;
        Ok(config)
    }
}

impl ResolvesServerCert for LiveCertificate {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let validation = hello.alpn().is_some_and(|mut offered| offered.any(|p| p == acme::ALPN));
        if validation {
            // Only the challenge certificate answers a validation: a
            // handshake asking for acme-tls/1 otherwise fails.
            let challenges = self.challenges.read().unwrap_or_else(|e| e.into_inner());
            let domain = hello.server_name()?.to_ascii_lowercase();
            return challenges.get(&domain).cloned();
        }
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's (and portal client's) side: trust exactly the key (or, for
/// an old token, the certificate) with `pin`.
pub fn client_config(pin: Fingerprint) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned::new(pin)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;
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
    async fn the_pinned_key_is_accepted_and_any_other_refused() {
        let gateway = Identity::generate(&["gateway".into()]).unwrap();
        let impostor = Identity::generate(&["gateway".into()]).unwrap();
        assert_eq!(handshake(&gateway, gateway.pin()).await, Ok(b"hello".to_vec()));
        let refused = handshake(&impostor, gateway.pin()).await.unwrap_err();
        assert!(refused.contains("public key pin"), "{refused}");
    }

    #[tokio::test]
    async fn a_renewal_keeps_key_pins_and_ends_certificate_pins() {
        let names = ["gw.example.org".to_string(), "192.0.2.7".to_string()];
        let gateway = Identity::generate(&names).unwrap();
        let renewed = gateway.reissue(&names).unwrap();
        assert_eq!(renewed.pin(), gateway.pin());
        assert_ne!(renewed.fingerprint(), gateway.fingerprint());
        assert_ne!(renewed.summary().unwrap().serial, gateway.summary().unwrap().serial);
        assert_eq!(handshake(&renewed, gateway.pin()).await, Ok(b"hello".to_vec()));
        // A token from before key pins holds the certificate's hash: it
        // holds until that certificate is renewed.
        assert_eq!(handshake(&gateway, gateway.fingerprint()).await, Ok(b"hello".to_vec()));
        assert!(handshake(&renewed, gateway.fingerprint()).await.is_err());
    }

    #[test]
    fn a_made_certificate_names_the_host_and_lasts_a_year() {
        let id = Identity::generate(&["gw.example.org".into(), "192.0.2.7".into()]).unwrap();
        let s = id.summary().unwrap();
        assert_eq!(
            (s.subject.as_str(), s.issuer.as_str()),
            ("CN=gw.example.org", "CN=gw.example.org")
        );
        assert!(s.self_signed() && !s.old_default());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(s.not_before <= now && now - s.not_before <= 3_700, "{s:?}");
        assert_eq!(s.not_after - s.not_before, SELF_SIGNED_LIFETIME.as_secs() + 3_600);
        assert!(s.renew_at() > now + 200 * 86_400 && s.renew_at() < s.not_after - 100 * 86_400);
        assert_eq!(s.serial.len(), 32);
        // What earlier releases made is recognised, to be renewed away.
        let old = rcgen::generate_simple_self_signed(vec!["gatekeeper".to_string()]).unwrap();
        let old = Summary::of(old.cert.der()).unwrap();
        assert!(old.old_default() && old.self_signed(), "{old:?}");
    }

    #[tokio::test]
    async fn a_live_certificate_is_replaced_for_the_next_handshake() {
        let first = Identity::generate(&["gateway".into()]).unwrap();
        let other = Identity::generate(&["gateway".into()]).unwrap();
        let live = LiveCertificate::new(&first).unwrap();
        let config = Arc::new(live.server_config().unwrap());
        let seen = |config: Arc<rustls::ServerConfig>| async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let srv = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let _ = TlsAcceptor::from(config).accept(tcp).await;
            });
            let tcp = TcpStream::connect(addr).await.unwrap();
            let e = TlsConnector::from(client_config(Fingerprint([0; 32])).unwrap())
                .connect(ServerName::try_from("gateway").unwrap(), tcp)
                .await
                .map(|_| ())
                .unwrap_err();
            srv.abort();
            PinMismatch::behind(&e).unwrap().key
        };
        assert_eq!(seen(config.clone()).await, Some(first.pin()));
        live.replace(&other).unwrap();
        assert_eq!(seen(config).await, Some(other.pin()));
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
        let e = TlsConnector::from(client_config(gateway.pin()).unwrap())
            .connect(ServerName::try_from("gateway").unwrap(), tcp)
            .await
            .map(|_| ())
            .unwrap_err();
        let mismatch = PinMismatch::behind(&e).expect("the verifier's refusal");
        assert_eq!(
            (mismatch.key, mismatch.certificate, mismatch.pinned.clone()),
            (Some(impostor.pin()), impostor.fingerprint(), vec![gateway.pin()])
        );
        assert!(PinMismatch::behind(&std::io::Error::other("elsewhere")).is_none());
        srv.abort();
    }

    #[test]
    fn identities_round_trip_through_pem_and_fingerprints_through_text() {
        let id = Identity::generate(&["gw.example".into()]).unwrap();
        let (cert, key) = id.to_pem();
        let back = Identity::from_pem(cert, key).unwrap();
        assert_eq!((back.pin(), back.fingerprint()), (id.pin(), id.fingerprint()));
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
