//! rustls on both sides, nothing but the SM provider in either: the
//! handshake negotiates TLS_SM4_GCM_SM3 over curveSM2, checks the server's
//! sm2sig_sm3 CertificateVerify, and carries data both ways.

use std::{sync::Arc, time::Duration};

use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, ServerConfig, ServerConnection, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    version::TLS13,
};

/// Accepts exactly `pinned`, and checks the handshake signature with the
/// SM provider's algorithms.
#[derive(Debug)]
struct Exactly {
    pinned: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Exactly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        assert_eq!(end_entity.as_ref(), self.pinned.as_ref());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        unreachable!("TLS 1.3 only")
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn certificate(key: &crate::Sm2Key) -> CertificateDer<'static> {
    crate::self_signed(key, "server", Duration::from_secs(3600)).unwrap()
}

/// A client that pins `pinned`, and a server presenting `cert` while
/// signing with `key`.
fn configs(
    pinned: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: &crate::Sm2Key,
) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let provider = Arc::new(crate::provider());
    let key = PrivateKeyDer::from_pem_slice(key.to_pkcs8_pem().as_bytes()).unwrap();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Exactly { pinned, provider }))
        .with_no_client_auth();
    (Arc::new(client), Arc::new(server))
}

fn connect(configs: (Arc<ClientConfig>, Arc<ServerConfig>)) -> (ClientConnection, ServerConnection) {
    let client = ClientConnection::new(configs.0, ServerName::try_from("server").unwrap()).unwrap();
    (client, ServerConnection::new(configs.1).unwrap())
}

/// Moves records between the two until neither has anything to say.
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), rustls::Error> {
    for _ in 0..20 {
        let mut moved = false;
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut rest = buf.as_slice();
            while !rest.is_empty() {
                server.read_tls(&mut rest).unwrap();
                server.process_new_packets()?;
            }
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut rest = buf.as_slice();
            while !rest.is_empty() {
                client.read_tls(&mut rest).unwrap();
                client.process_new_packets()?;
            }
        }
        if !moved {
            return Ok(());
        }
    }
    panic!("handshake did not settle")
}

#[test]
fn negotiates_sm4_gcm_sm3_over_curve_sm2_and_carries_data() {
    use std::io::{Read, Write};
    let key = crate::Sm2Key::generate();
    let cert = certificate(&key);
    let (mut client, mut server) = connect(configs(cert.clone(), cert, &key));
    pump(&mut client, &mut server).unwrap();
    assert!(!client.is_handshaking() && !server.is_handshaking());
    assert_eq!(client.negotiated_cipher_suite().unwrap().suite(), crate::SM4_GCM_SM3);
    assert_eq!(server.negotiated_key_exchange_group().unwrap().name(), crate::CURVE_SM2);

    client.writer().write_all(b"ping").unwrap();
    server.writer().write_all(&[7u8; 12_000]).unwrap();
    pump(&mut client, &mut server).unwrap();
    let mut got = [0u8; 4];
    server.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    let mut big = vec![0u8; 12_000];
    client.reader().read_exact(&mut big).unwrap();
    assert!(big.iter().all(|b| *b == 7));
}

#[test]
fn a_server_signing_with_another_key_than_its_certificate_is_refused() {
    let real = crate::Sm2Key::generate();
    let cert = certificate(&real);
    let (mut client, mut server) = connect(configs(cert.clone(), cert, &crate::Sm2Key::generate()));
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
        ),
        "{err:?}"
    );
}
