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
//! Each direction has its own traffic secret and key, and the nonce is the
//! record's number. A record that is dropped, repeated, reordered, cut or
//! altered fails to open and ends the session.
//!
//! Keys are refreshed in long sessions, as TLS 1.3's KeyUpdate does: the
//! sender marks a record [`UPDATE`] once its key has sealed [`Rekey`]'s
//! bytes or time (and at most [`EPOCH`] records, 64 GiB, a sixth of the
//! limit RFC 8446 section 5.5 sets for AES-GCM), and both ends move that
//! direction to the next secret, derived from the current one, which is
//! then forgotten: a key taken from a running session opens nothing sent
//! before its update. A sender that also marks [`REQUESTED`] asks the
//! peer to update its own direction, which it does with its next record.
//! Both marks ride in the length word, which is authenticated.

use std::{
    ops::DerefMut,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

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
/// In a record's length word: the sender's key changes after this record.
pub const UPDATE: u32 = 1 << 31;
/// In a record's length word: the sender asks the peer to update its key too.
pub const REQUESTED: u32 = 1 << 30;

/// When a sender refreshes its key: after this many bytes sealed under it,
/// or this long, whichever comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rekey {
    pub bytes: u64,
    pub after: std::time::Duration,
}

impl Default for Rekey {
    /// 16 GiB or an hour.
    fn default() -> Rekey {
        Rekey {
            bytes: 16 << 30,
            after: std::time::Duration::from_secs(3600),
        }
    }
}

/// How many key updates one direction has made, and how many plaintext
/// bytes it has carried: shared with whoever reports on the session.
#[derive(Debug, Default)]
pub struct KeyEpochs {
    pub updates: AtomicU64,
    pub bytes: AtomicU64,
}
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

    /// Both halves of `side`'s record layer over `tcp`, linked so that
    /// the writer answers the peer's requests to update.
    pub fn split(&self, tcp: TcpStream, side: Side) -> Records {
        let (rd, wr) = tcp.into_split();
        let (rd, mut wr) = (RecordReader::new(rd, self, side), RecordWriter::new(wr, self, side));
        wr.requested = rd.requested.clone();
        (rd, wr)
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

/// One direction's keys: the current traffic secret and its key, the
/// count of records so far (the next nonce), and what the current key has
/// sealed since it took over.
struct Keys {
    secret: hkdf::Prk,
    direction: &'static [u8],
    key: LessSafeKey,
    sealed: u64,
    since: Instant,
    records: u64,
    bytes: u64,
    epochs: Arc<KeyEpochs>,
}

impl Keys {
    fn new(secret: &SessionSecret, direction: &'static [u8]) -> Keys {
        let first = next_secret(&secret.0, direction);
        Keys {
            key: key_of(&first),
            secret: first,
            direction,
            sealed: 0,
            since: Instant::now(),
            records: 0,
            bytes: 0,
            epochs: Arc::new(KeyEpochs::default()),
        }
    }

    /// The next record's nonce, counting a record of `plain` bytes.
    fn next_nonce(&mut self, plain: usize) -> Nonce {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[NONCE_LEN - 8..].copy_from_slice(&self.sealed.to_be_bytes());
        self.sealed += 1;
        self.records += 1;
        self.bytes += plain as u64;
        self.epochs.bytes.fetch_add(plain as u64, Ordering::Relaxed);
        Nonce::assume_unique_for_key(nonce)
    }

    /// Whether the record about to be sealed must be this key's last.
    fn due(&self, rekey: &Rekey) -> bool {
        self.records + 1 >= EPOCH || self.bytes >= rekey.bytes || self.since.elapsed() >= rekey.after
    }

    /// Moves to the next secret and key; the current ones are dropped.
    fn update(&mut self) {
        self.secret = next_secret(&self.secret, self.direction);
        self.key = key_of(&self.secret);
        (self.since, self.records, self.bytes) = (Instant::now(), 0, 0);
        self.epochs.updates.fetch_add(1, Ordering::Relaxed);
    }
}

/// The traffic secret after `secret`, for `direction`.
fn next_secret(secret: &hkdf::Prk, direction: &[u8]) -> hkdf::Prk {
    let mut next = [0u8; 32];
    secret
        .expand(&[b"traffic upd ", direction], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut next))
        .expect("32 bytes are within HKDF's output limit");
    hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &next)
}

/// The AEAD key of a traffic secret.
fn key_of(secret: &hkdf::Prk) -> LessSafeKey {
    let okm = secret
        .expand(&[b"key"], &AES_256_GCM)
        .expect("a 32-byte key is within HKDF's output limit");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Seals frames into records and writes them.
pub struct RecordWriter<W> {
    io: W,
    keys: Keys,
    rekey: Rekey,
    /// Set by this side's reader when the peer asked for an update.
    requested: Arc<AtomicBool>,
    /// The record being filled: its length's place, then frames.
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> RecordWriter<W> {
    pub fn new(io: W, secret: &SessionSecret, side: Side) -> RecordWriter<W> {
        RecordWriter {
            io,
            keys: Keys::new(secret, side.sends()),
            rekey: Rekey::default(),
            requested: Arc::new(AtomicBool::new(false)),
            buf: vec![0u8; LENGTH],
        }
    }

    /// Refreshes this direction's key after `rekey`'s bytes or time.
    pub fn rekey_after(&mut self, rekey: Rekey) {
        self.rekey = rekey;
    }

    /// This direction's key updates and bytes, as they happen.
    pub fn epochs(&self) -> Arc<KeyEpochs> {
        self.keys.epochs.clone()
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
        // Answering the peer's request, or this key's time is up; the first
        // asks nothing back, the second asks the peer to follow.
        let (answering, due) = (
            self.requested.swap(false, Ordering::Relaxed),
            self.keys.due(&self.rekey),
        );
        let marks = match (answering, due) {
            (_, true) => UPDATE | REQUESTED,
            (true, false) => UPDATE,
            (false, false) => 0,
        };
        let plain = self.buf.len() - LENGTH;
        let length = ((plain + TAG) as u32 | marks).to_be_bytes();
        let nonce = self.keys.next_nonce(plain);
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(length), &mut self.buf[LENGTH..])
            .map_err(|_| RecordError::Size(self.buf.len()))?;
        self.buf[..LENGTH].copy_from_slice(&length);
        self.buf.extend_from_slice(tag.as_ref());
        if marks != 0 {
            self.keys.update();
        }
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
    /// Tells this side's writer the peer asked for an update.
    requested: Arc<AtomicBool>,
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
            requested: Arc::new(AtomicBool::new(false)),
            unread: BytesMut::new(),
            plain: BytesMut::new(),
        }
    }

    /// The peer's key updates and bytes, as they arrive.
    pub fn epochs(&self) -> Arc<KeyEpochs> {
        self.keys.epochs.clone()
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
                    let len = (u32::from_be_bytes(*length) & !(UPDATE | REQUESTED)) as usize;
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
        let nonce = self.keys.next_nonce(len - TAG);
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(length), &mut record)
            .map_err(|_| RecordError::Forged)?
            .len();
        record.truncate(plain);
        self.plain = record;
        // Authenticated with the record, so trusted from here.
        let marks = u32::from_be_bytes(length);
        if marks & UPDATE != 0 {
            self.keys.update();
        }
        if marks & REQUESTED != 0 {
            self.requested.store(true, Ordering::Relaxed);
        }
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

    /// Frames sealed by a writer that updates after every `bytes`, each
    /// record flushed on its own.
    async fn sealed_updating(frames: &[Frame], bytes: u64) -> (Vec<u8>, u64) {
        let mut wire = Vec::new();
        let mut w = RecordWriter::new(&mut wire, &secret(), Side::Gateway);
        w.rekey_after(Rekey {
            bytes,
            after: std::time::Duration::from_secs(3600),
        });
        let epochs = w.epochs();
        for f in frames {
            w.push(f).await.unwrap();
            w.flush().await.unwrap();
        }
        (wire, epochs.updates.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn keys_update_by_bytes_and_the_reader_follows() {
        let (wire, updates) = sealed_updating(&frames(), 20_000).await;
        assert!(updates >= 3, "{updates} updates");
        let mut r = RecordReader::new(&wire[..], &secret(), Side::Agent);
        let epochs = r.epochs();
        let mut got = Vec::new();
        while let Some(f) = r.frame().await.unwrap() {
            got.push(f);
        }
        assert_eq!(got, frames());
        assert_eq!(
            epochs.updates.load(Ordering::Relaxed),
            updates,
            "the reader moved with each"
        );
        assert!(
            r.requested.load(Ordering::Relaxed),
            "and was asked to update its own key"
        );
        let (plain, _) = sealed_updating(&frames(), u64::MAX).await;
        assert_ne!(
            plain[plain.len() - 64..],
            wire[wire.len() - 64..],
            "later records under other keys"
        );
    }

    #[tokio::test]
    async fn an_update_mark_cannot_be_added_or_removed() {
        let (wire, _) = sealed_updating(&frames()[..2], 0).await;
        let mut stripped = wire.clone();
        stripped[0] &= 0x3f;
        assert!(matches!(opened(&stripped).await, Err(RecordError::Forged)));
        let plain = sealed(&frames()[..2], true).await;
        let mut marked = plain.clone();
        marked[0] |= 0x80;
        assert!(matches!(opened(&marked).await, Err(RecordError::Forged)));
    }

    #[test]
    fn each_secret_follows_from_the_last_and_differs() {
        let mut keys = Keys::new(&secret(), b"x");
        let first = seal_with(&keys.key, 0);
        keys.update();
        let second = seal_with(&keys.key, 0);
        assert_ne!(first, second);
        let mut again = Keys::new(&secret(), b"x");
        again.update();
        assert_eq!(seal_with(&again.key, 0), second, "both ends derive the same next key");
        let mut other = Keys::new(&secret(), b"y");
        other.update();
        assert_ne!(seal_with(&other.key, 0), second, "each direction its own");
    }
}
