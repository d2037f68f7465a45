//! The running session's own record layer. TLS 1.3 authenticates the
//! gateway and agrees a secret; once the agent is welcomed, both ends leave
//! TLS's record layer for this one and key it from that secret through
//! TLS's exporter (RFC 8446, section 7.5). Two reasons:
//!
//! - Reading and writing become independent halves, one task each, so
//!   decryption and encryption run on both cores instead of taking turns
//!   behind one lock around a TLS connection.
//! - A record holds up to [`MAX_PLAINTEXT`] bytes of frames, several frames
//!   to a record, against TLS's 16 KiB: fewer seals, fewer system calls.
//!
//! On the wire a record is a 4-byte big-endian length and that many bytes
//! of AES-256-GCM ciphertext and tag; the length is the associated data.
//! Each direction has its own key, and a fresh one every [`EPOCH`] records
//! (derived, never sent): at most 64 GiB under one key, a sixth of the
//! limit RFC 8446 (section 5.5) sets for AES-GCM; the nonce is the record's
//! number. A record that is dropped,
//! repeated, reordered, cut or altered fails to open and ends the session.

use std::ops::DerefMut;

use bytes::{Buf, BytesMut};
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hkdf,
};
use rustls::{ConnectionCommon, ProtocolVersion};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use crate::frame::{Frame, FrameError};

/// Most frame bytes in one record.
pub const MAX_PLAINTEXT: usize = 256 * 1024;

/// Records sealed under one key before the next is derived: with
/// [`MAX_PLAINTEXT`], 64 GiB.
pub const EPOCH: u64 = 1 << 18;

const LENGTH: usize = 4;
const TAG: usize = 16;
const EXPORTER_LABEL: &[u8] = b"EXPORTER-gatekeeper-tunnel-records";

/// How a TLS 1.3 record starts; as a length it would be far over the limit,
/// so a peer that sends one is a peer that never left TLS.
const TLS_APPLICATION_DATA: [u8; 3] = [0x17, 0x03, 0x03];

/// The least a reader asks the socket for: enough that a busy session
/// takes several records per system call, while an idle one holds little.
const READ_AHEAD: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum RecordError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the session negotiated {0:?}; tunnels need TLS 1.3")]
    NotTls13(ProtocolVersion),
    #[error("deriving the session's keys from TLS")]
    Export(#[source] rustls::Error),
    #[error("the peer sent data before its turn in the handshake")]
    EarlyData,
    #[error("record of {0} bytes is outside 16 to {max} bytes", max = MAX_PLAINTEXT + TAG)]
    Size(usize),
    #[error("a record failed authentication: altered, replayed, reordered or forged")]
    Forged,
    #[error(
        "the peer still speaks TLS after the welcome: it runs an older Gatekeeper; upgrade both ends to one version"
    )]
    StillTls,
    #[error("a frame crosses a record boundary")]
    SplitFrame,
    #[error("the peer closed the connection inside a record")]
    Truncated,
}

/// Which end of the session this is; each end seals with its own key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Gateway,
    Agent,
}

impl Side {
    fn sends(self) -> &'static [u8] {
        match self {
            Side::Gateway => b"gateway to agent",
            Side::Agent => b"agent to gateway",
        }
    }

    fn receives(self) -> &'static [u8] {
        match self {
            Side::Gateway => Side::Agent.sends(),
            Side::Agent => Side::Gateway.sends(),
        }
    }
}

/// The secret both ends share once TLS is done, which every record key is
/// derived from.
pub struct SessionSecret(hkdf::Prk);

impl SessionSecret {
    /// Exports the secret from a finished TLS 1.3 handshake. `tls` must
    /// hold no application data the peer already sent: the protocol has
    /// each end speak in turn until both have left TLS.
    pub fn of_tls<D>(tls: &mut ConnectionCommon<D>) -> Result<SessionSecret, RecordError> {
        match tls.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => {}
            other => return Err(RecordError::NotTls13(other.unwrap_or(ProtocolVersion::Unknown(0)))),
        }
        if matches!(std::io::Read::read(&mut tls.reader(), &mut [0u8; 1]), Ok(1..)) {
            return Err(RecordError::EarlyData);
        }
        let secret = tls
            .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
            .map_err(RecordError::Export)?;
        Ok(SessionSecret::from_bytes(&secret))
    }

    /// A secret from raw bytes: what TLS exported, or a test's own.
    pub fn from_bytes(secret: &[u8; 32]) -> SessionSecret {
        SessionSecret(hkdf::Salt::new(hkdf::HKDF_SHA256, b"gatekeeper tunnel records").extract(secret))
    }

    /// Both halves of `side`'s record layer over `tcp`.
    pub fn split(&self, tcp: TcpStream, side: Side) -> Records {
        let (rd, wr) = tcp.into_split();
        (RecordReader::new(rd, self, side), RecordWriter::new(wr, self, side))
    }
}

/// Leaves TLS for `side`'s record layer: takes what a TLS stream's
/// `into_inner` gives, its socket and its finished connection.
pub fn leave_tls<C, D>((tcp, mut tls): (TcpStream, C), side: Side) -> Result<Records, RecordError>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
{
    Ok(SessionSecret::of_tls(&mut tls)?.split(tcp, side))
}

/// Both halves of a session's record layer over TCP.
pub type Records = (RecordReader<OwnedReadHalf>, RecordWriter<OwnedWriteHalf>);

/// One direction's keys: the current epoch's, and the count of records so
/// far, which is the next nonce.
struct Keys {
    prk: hkdf::Prk,
    direction: &'static [u8],
    key: LessSafeKey,
    sealed: u64,
}

impl Keys {
    fn new(secret: &SessionSecret, direction: &'static [u8]) -> Keys {
        Keys {
            prk: secret.0.clone(),
            direction,
            key: epoch_key(&secret.0, direction, 0),
            sealed: 0,
        }
    }

    /// The next record's nonce, moving to the next epoch's key first when
    /// this one's records are used up.
    fn next_nonce(&mut self) -> Nonce {
        if self.sealed > 0 && self.sealed.is_multiple_of(EPOCH) {
            self.key = epoch_key(&self.prk, self.direction, self.sealed / EPOCH);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[NONCE_LEN - 8..].copy_from_slice(&self.sealed.to_be_bytes());
        self.sealed += 1;
        Nonce::assume_unique_for_key(nonce)
    }
}

fn epoch_key(prk: &hkdf::Prk, direction: &[u8], epoch: u64) -> LessSafeKey {
    let epoch = epoch.to_be_bytes();
    let info = [direction, &epoch[..]];
    let okm = prk
        .expand(&info, &AES_256_GCM)
        .expect("a 32-byte key is within HKDF's output limit");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Seals frames into records and writes them.
pub struct RecordWriter<W> {
    io: W,
    keys: Keys,
    /// The record being filled: its length's place, then frames.
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> RecordWriter<W> {
    pub fn new(io: W, secret: &SessionSecret, side: Side) -> RecordWriter<W> {
        RecordWriter {
            io,
            keys: Keys::new(secret, side.sends()),
            buf: vec![0u8; LENGTH],
        }
    }

    /// Adds `frame` to the record being filled, first sending that record
    /// if the frame would not fit.
    pub async fn push(&mut self, frame: &Frame) -> Result<(), RecordError> {
        if self.buf.len() - LENGTH + frame.encoded_len() > MAX_PLAINTEXT {
            self.flush().await?;
        }
        frame.encode(&mut self.buf)?;
        Ok(())
    }

    /// Seals and sends the record being filled, if it holds anything.
    pub async fn flush(&mut self) -> Result<(), RecordError> {
        if self.buf.len() == LENGTH {
            return Ok(());
        }
        let length = ((self.buf.len() - LENGTH + TAG) as u32).to_be_bytes();
        let nonce = self.keys.next_nonce();
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(length), &mut self.buf[LENGTH..])
            .map_err(|_| RecordError::Size(self.buf.len()))?;
        self.buf[..LENGTH].copy_from_slice(&length);
        self.buf.extend_from_slice(tag.as_ref());
        self.io.write_all(&self.buf).await?;
        self.buf.truncate(LENGTH);
        Ok(())
    }

    /// Sends what is pending and ends this direction.
    pub async fn shutdown(&mut self) -> Result<(), RecordError> {
        self.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }
}

/// Reads records, opens them, and hands out their frames one by one. The
/// frames' payloads are the opened records' own memory: nothing is copied
/// after decryption.
pub struct RecordReader<R> {
    io: R,
    keys: Keys,
    /// Received and not yet opened.
    unread: BytesMut,
    /// An opened record's frames not yet handed out.
    plain: BytesMut,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    pub fn new(io: R, secret: &SessionSecret, side: Side) -> RecordReader<R> {
        RecordReader {
            io,
            keys: Keys::new(secret, side.receives()),
            unread: BytesMut::new(),
            plain: BytesMut::new(),
        }
    }

    /// The next frame; `Ok(None)` when the peer closed the connection
    /// between records.
    pub async fn frame(&mut self) -> Result<Option<Frame>, RecordError> {
        while self.plain.is_empty() {
            if !self.next_record().await? {
                return Ok(None);
            }
        }
        Frame::decode(&mut self.plain)?.map(Some).ok_or(RecordError::SplitFrame)
    }

    /// Opens the next record into `plain`; `false` at a clean end.
    async fn next_record(&mut self) -> Result<bool, RecordError> {
        loop {
            let wanted = match self.unread.first_chunk::<LENGTH>() {
                Some(length) => {
                    let len = u32::from_be_bytes(*length) as usize;
                    if length[..3] == TLS_APPLICATION_DATA {
                        return Err(RecordError::StillTls);
                    }
                    if !(TAG..=MAX_PLAINTEXT + TAG).contains(&len) {
                        return Err(RecordError::Size(len));
                    }
                    if self.unread.len() >= LENGTH + len {
                        self.open(len)?;
                        return Ok(true);
                    }
                    LENGTH + len
                }
                None => LENGTH,
            };
            // Room for the whole record, and for a fair read beyond it.
            self.unread.reserve((wanted - self.unread.len()).max(READ_AHEAD));
            match self.io.read_buf(&mut self.unread).await? {
                0 if self.unread.is_empty() => return Ok(false),
                0 => return Err(RecordError::Truncated),
                _ => {}
            }
        }
    }

    fn open(&mut self, len: usize) -> Result<(), RecordError> {
        let mut length = [0u8; LENGTH];
        length.copy_from_slice(&self.unread[..LENGTH]);
        self.unread.advance(LENGTH);
        let mut record = self.unread.split_to(len);
        let nonce = self.keys.next_nonce();
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(length), &mut record)
            .map_err(|_| RecordError::Forged)?
            .len();
        record.truncate(plain);
        self.plain = record;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::frame::{Kind, MAX_PAYLOAD};

    fn secret() -> SessionSecret {
        SessionSecret::from_bytes(&[7u8; 32])
    }

    async fn sealed(frames: &[Frame], flush_each: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut w = RecordWriter::new(&mut wire, &secret(), Side::Gateway);
        for f in frames {
            w.push(f).await.unwrap();
            if flush_each {
                w.flush().await.unwrap();
            }
        }
        w.flush().await.unwrap();
        wire
    }

    async fn opened(wire: &[u8]) -> Result<Vec<Frame>, RecordError> {
        let mut r = RecordReader::new(wire, &secret(), Side::Agent);
        let mut got = Vec::new();
        while let Some(f) = r.frame().await? {
            got.push(f);
        }
        Ok(got)
    }

    fn frames() -> Vec<Frame> {
        (0..12u32)
            .map(|i| Frame::new(Kind::Data, i, vec![i as u8; (i as usize * 7919) % MAX_PAYLOAD + 1]))
            .collect()
    }

    #[tokio::test]
    async fn frames_round_trip_many_to_a_record_or_one_each() {
        for flush_each in [false, true] {
            let wire = sealed(&frames(), flush_each).await;
            assert_eq!(opened(&wire).await.unwrap(), frames());
        }
    }

    #[tokio::test]
    async fn each_direction_has_its_own_key() {
        let wire = sealed(&frames(), false).await;
        let mut own = RecordReader::new(&wire[..], &secret(), Side::Gateway);
        assert!(matches!(own.frame().await, Err(RecordError::Forged)));
        let mut other = RecordReader::new(&wire[..], &SessionSecret::from_bytes(&[8u8; 32]), Side::Agent);
        assert!(matches!(other.frame().await, Err(RecordError::Forged)));
    }

    #[tokio::test]
    async fn every_flipped_bit_cut_or_reordering_is_refused() {
        let one = Frame::new(Kind::Data, 1, Bytes::from_static(b"payload"));
        let wire = sealed(&[one.clone(), one.clone()], true).await;
        let record = wire.len() / 2;
        for byte in 0..wire.len() {
            let mut bad = wire.clone();
            bad[byte] ^= 0x01;
            let got = opened(&bad).await;
            assert!(got.is_err(), "a flip in byte {byte} went unnoticed: {got:?}");
        }
        for cut in (1..wire.len()).filter(|c| *c != record) {
            let got = opened(&wire[..cut]).await;
            assert!(matches!(got, Err(RecordError::Truncated)), "cut at {cut}: {got:?}");
        }
        let swapped = [&wire[record..], &wire[..record]].concat();
        assert!(matches!(opened(&swapped).await, Err(RecordError::Forged)));
        let replayed = [&wire[..record], &wire[..record]].concat();
        assert!(matches!(opened(&replayed).await, Err(RecordError::Forged)));
    }

    #[tokio::test]
    async fn a_length_outside_the_limits_is_refused_before_reading_it() {
        for len in [0u32, TAG as u32 - 1, (MAX_PLAINTEXT + TAG + 1) as u32, u32::MAX] {
            let got = opened(&len.to_be_bytes()).await;
            assert!(matches!(got, Err(RecordError::Size(_))), "{len}: {got:?}");
        }
        let tls_record = [0x17, 0x03, 0x03, 0x00, 0x20];
        let got = opened(&tls_record).await;
        assert!(matches!(got, Err(RecordError::StillTls)), "{got:?}");
    }

    fn seal_with(key: &LessSafeKey, n: u64) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[NONCE_LEN - 8..].copy_from_slice(&n.to_be_bytes());
        let mut data = b"same words".to_vec();
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data)
            .unwrap();
        data.extend_from_slice(tag.as_ref());
        data
    }

    #[test]
    fn the_key_changes_at_each_epoch() {
        let prk = secret().0;
        let (first, second) = (epoch_key(&prk, b"x", 0), epoch_key(&prk, b"x", 1));
        let mut keys = Keys::new(&secret(), b"x");
        keys.sealed = EPOCH - 1;
        let nonce = keys.next_nonce();
        assert_eq!(nonce.as_ref()[NONCE_LEN - 8..], (EPOCH - 1).to_be_bytes());
        assert_eq!(seal_with(&keys.key, EPOCH - 1), seal_with(&first, EPOCH - 1));
        let nonce = keys.next_nonce();
        assert_eq!(nonce.as_ref()[NONCE_LEN - 8..], EPOCH.to_be_bytes());
        assert_eq!(seal_with(&keys.key, EPOCH), seal_with(&second, EPOCH));
        assert_ne!(seal_with(&second, EPOCH), seal_with(&first, EPOCH));
    }
}
