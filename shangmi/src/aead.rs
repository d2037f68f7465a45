//! Record protection with SM4 (GB/T 32907) in GCM and in CCM, as RFC 8998
//! section 3.1 uses them: 128-bit key, 96-bit nonce, 128-bit tag, the
//! TLS 1.3 record nonce and additional data of RFC 8446 section 5.

use std::marker::PhantomData;

use aes_gcm::{
    AesGcm,
    aead::{AeadCore, AeadInPlace, KeyInit, consts::U12, consts::U16, generic_array::GenericArray},
};
use ccm::Ccm;
use rustls::{
    ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion,
    crypto::cipher::{
        AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter, MessageEncrypter, Nonce,
        OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload, Tls13AeadAlgorithm, UnsupportedOperationError,
        make_tls13_aad,
    },
};
use sm4::Sm4;

pub type Sm4Gcm = AesGcm<Sm4, U12>;
pub type Sm4Ccm = Ccm<Sm4, U16, U12>;

const KEY_LEN: usize = 16;
const TAG_LEN: usize = 16;

/// One of the two SM4 modes, as rustls's factory for record protection.
pub struct Sm4Aead<A>(PhantomData<A>);

pub const SM4_GCM: Sm4Aead<Sm4Gcm> = Sm4Aead(PhantomData);
pub const SM4_CCM: Sm4Aead<Sm4Ccm> = Sm4Aead(PhantomData);

impl<A> Tls13AeadAlgorithm for Sm4Aead<A>
where
    A: AeadInPlace + KeyInit + AeadCore<NonceSize = U12, TagSize = U16> + Send + Sync + 'static,
{
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(Protect {
            cipher: cipher::<A>(&key),
            iv,
        })
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(Protect {
            cipher: cipher::<A>(&key),
            iv,
        })
    }

    fn key_len(&self) -> usize {
        KEY_LEN
    }

    /// Kernel TLS knows no SM4 through rustls's secret types.
    fn extract_keys(&self, _key: AeadKey, _iv: Iv) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Err(UnsupportedOperationError)
    }
}

fn cipher<A: KeyInit>(key: &AeadKey) -> A {
    // rustls hands over exactly `key_len()` bytes.
    A::new(GenericArray::from_slice(&key.as_ref()[..KEY_LEN]))
}

/// One direction of a connection's record protection.
struct Protect<A> {
    cipher: A,
    iv: Iv,
}

impl<A> MessageEncrypter for Protect<A>
where
    A: AeadInPlace + AeadCore<NonceSize = U12, TagSize = U16> + Send + Sync,
{
    fn encrypt(&mut self, msg: OutboundPlainMessage<'_>, seq: u64) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        let nonce = Nonce::new(&self.iv, seq);
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                GenericArray::from_slice(&nonce.0),
                &make_tls13_aad(total_len),
                payload.as_mut(),
            )
            .map_err(|_| Error::EncryptError)?;
        payload.extend_from_slice(&tag);
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + TAG_LEN
    }
}

impl<A> MessageDecrypter for Protect<A>
where
    A: AeadInPlace + AeadCore<NonceSize = U12, TagSize = U16> + Send + Sync,
{
    fn decrypt<'a>(&mut self, mut msg: InboundOpaqueMessage<'a>, seq: u64) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        let Some(text_len) = payload.len().checked_sub(TAG_LEN) else {
            return Err(Error::DecryptError);
        };
        let aad = make_tls13_aad(payload.len());
        let nonce = Nonce::new(&self.iv, seq);
        let (text, tag) = payload.split_at_mut(text_len);
        self.cipher
            .decrypt_in_place_detached(
                GenericArray::from_slice(&nonce.0),
                &aad,
                text,
                GenericArray::from_slice(tag),
            )
            .map_err(|_| Error::DecryptError)?;
        payload.truncate(text_len);
        msg.into_tls13_unpadded_message()
    }
}

#[cfg(test)]
mod tests {
    use aes_gcm::aead::Aead;
    use aes_gcm::aead::Payload;
    use hex_literal::hex;

    use super::*;

    // RFC 8998, Appendix A: the same key, nonce, plaintext and data for both modes.
    const KEY: [u8; 16] = hex!("0123456789ABCDEFFEDCBA9876543210");
    const NONCE: [u8; 12] = hex!("00001234567800000000ABCD");
    const AAD: [u8; 20] = hex!("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2");
    const PLAINTEXT: [u8; 64] = hex!(
        "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
        "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
    );

    fn check<A: Aead + KeyInit + AeadCore<NonceSize = U12>>(expected: &[u8]) {
        let cipher = A::new(GenericArray::from_slice(&KEY));
        let nonce = GenericArray::from_slice(&NONCE);
        let sealed = cipher
            .encrypt(
                nonce,
                Payload {
                    msg: &PLAINTEXT,
                    aad: &AAD,
                },
            )
            .unwrap();
        assert_eq!(sealed, expected);
        let opened = cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed,
                    aad: &AAD,
                },
            )
            .unwrap();
        assert_eq!(opened, PLAINTEXT);
        for at in [0, 40, sealed.len() - 1] {
            let mut damaged = sealed.clone();
            damaged[at] ^= 1;
            assert!(
                cipher
                    .decrypt(
                        nonce,
                        Payload {
                            msg: &damaged,
                            aad: &AAD
                        }
                    )
                    .is_err(),
                "byte {at}"
            );
        }
        assert!(
            cipher
                .decrypt(
                    nonce,
                    Payload {
                        msg: &sealed,
                        aad: b"other"
                    }
                )
                .is_err()
        );
    }

    /// RFC 8998, A.1.
    #[test]
    fn sm4_gcm_reproduces_the_rfc_vector() {
        check::<Sm4Gcm>(&hex!(
            "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
            "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
            "83DE3541E4C2B58177E065A9BF7B62EC"
        ));
    }

    /// RFC 8998, A.2.
    #[test]
    fn sm4_ccm_reproduces_the_rfc_vector() {
        check::<Sm4Ccm>(&hex!(
            "48AF93501FA62ADBCD414CCE6034D895DDA1BF8F132F042098661572E7483094"
            "FD12E518CE062C98ACEE28D95DF4416BED31A2F04476C18BB40C84A74B97DC5B"
            "16842D4FA186F56AB33256971FA110F4"
        ));
    }

    /// GB/T 32907-2016, Appendix A, example 1: one block under SM4.
    #[test]
    fn sm4_block_is_the_standard_vector() {
        use sm4::cipher::BlockEncrypt;
        let cipher = Sm4::new(GenericArray::from_slice(&KEY));
        let mut block = GenericArray::clone_from_slice(&KEY);
        cipher.encrypt_block(&mut block);
        assert_eq!(block.as_slice(), hex!("681EDF34D206965E86B3E94F536E4246"));
    }

    /// A record sealed under a sequence number opens under that number
    /// only, and its content type survives the trip.
    #[test]
    fn records_open_under_their_own_sequence_number() {
        for alg in [&SM4_GCM as &dyn Tls13AeadAlgorithm, &SM4_CCM] {
            let mut enc = alg.encrypter(key(), Iv::from(NONCE));
            let mut dec = alg.decrypter(key(), Iv::from(NONCE));
            let chunks = [&b"hello"[..]];
            let plain = OutboundPlainMessage {
                typ: ContentType::Handshake,
                version: ProtocolVersion::TLSv1_3,
                payload: rustls::crypto::cipher::OutboundChunks::new(&chunks),
            };
            let sealed = enc.encrypt(plain, 7).unwrap().encode();
            let mut body = sealed[5..].to_vec();
            let wrong = InboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, &mut body);
            assert!(dec.decrypt(wrong, 8).is_err());
            let mut body = sealed[5..].to_vec();
            let right = InboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, &mut body);
            let opened = dec.decrypt(right, 7).unwrap();
            assert_eq!(opened.typ, ContentType::Handshake);
            assert_eq!(opened.payload, b"hello");
        }
    }

    /// rustls's keys are 32-byte buffers; SM4 takes the first 16.
    fn key() -> AeadKey {
        let mut full = [0u8; 32];
        full[..16].copy_from_slice(&KEY);
        AeadKey::from(full)
    }
}
