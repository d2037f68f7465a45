//! Frames inside the agent's session. Each is a 9-byte header (type,
//! stream id, payload length, big-endian) and up to [`MAX_PAYLOAD`] bytes.
//! The handshake's frames travel in TLS records; a running session's in
//! [`crate::record`]s, several to a record.
//! Stream 0 is the session itself; public connections get ids from 1.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Larger frames are a protocol error: a peer cannot make the other side
/// buffer more than this per frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Agent to gateway, stream 0: the token's id and secret.
    Hello = 1,
    /// Gateway to agent, stream 0: accepted; payload is the public port.
    Welcome = 2,
    /// Either way, stream 0: the session ends; payload is the reason.
    Goodbye = 3,
    /// Gateway to agent: a public connection arrived on this stream.
    Open = 4,
    Data = 5,
    /// The sender may send this many more bytes on the stream.
    Window = 6,
    /// The stream is done in the sender's direction.
    Close = 7,
    Ping = 8,
    Pong = 9,
    /// Gateway to agent, stream 0: something the agent's operator should
    /// know that does not end the session (the tunnel paused or resumed).
    Notice = 10,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        [Hello, Welcome, Goodbye, Open, Data, Window, Close, Ping, Pong, Notice]
            .into_iter()
            .find(|k| *k as u8 == v)
    }
}

/// Why a session ends or is refused, as a Goodbye frame tells the other
/// end: a code the agent decides by (stop, or try again), and words for
/// the operator. On the wire: `CODE:words`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Farewell {
    /// The tunnel was revoked or has expired: stop.
    Revoked(String),
    /// The token was not accepted: trying again with it cannot help.
    Refused(String),
    /// Something that may pass: the public port is busy, the gateway stops.
    Busy(String),
    /// The peer broke the protocol and is cut off.
    Broken(String),
    /// The agent's operator ended the session on purpose: do not retry.
    Stopped(String),
}

impl Farewell {
    fn parts(&self) -> (&'static str, &str) {
        match self {
            Farewell::Revoked(w) => ("revoked", w),
            Farewell::Refused(w) => ("refused", w),
            Farewell::Busy(w) => ("busy", w),
            Farewell::Broken(w) => ("broken", w),
            Farewell::Stopped(w) => ("stopped", w),
        }
    }

    pub fn to_payload(&self) -> Bytes {
        let (code, words) = self.parts();
        Bytes::from(format!("{code}:{words}"))
    }

    /// Reads a Goodbye's payload; anything unrecognised counts as broken
    /// (which an agent retries).
    pub fn from_payload(payload: &[u8]) -> Farewell {
        let text = String::from_utf8_lossy(payload);
        let (code, words) = text.split_once(':').unwrap_or(("", &text));
        let words = words.to_string();
        match code {
            "revoked" => Farewell::Revoked(words),
            "refused" => Farewell::Refused(words),
            "busy" => Farewell::Busy(words),
            "broken" => Farewell::Broken(words),
            "stopped" => Farewell::Stopped(words),
            _ => Farewell::Broken(if code.is_empty() { words } else { text.into_owned() }),
        }
    }

    /// Whether trying again later may succeed.
    pub fn retry_helps(&self) -> bool {
        matches!(self, Farewell::Busy(_) | Farewell::Broken(_))
    }
}

impl std::fmt::Display for Farewell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (code, words) = self.parts();
        write!(f, "{code}: {words}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub stream: u32,
    pub payload: Bytes,
}

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("unknown frame type {0}")]
    Kind(u8),
    #[error("frame of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("the peer closed the connection inside a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Bytes before a frame's payload.
pub const HEADER: usize = 9;

impl Frame {
    pub fn new(kind: Kind, stream: u32, payload: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            stream,
            payload: payload.into(),
        }
    }

    /// Bytes this frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER + self.payload.len()
    }

    fn header(&self) -> Result<[u8; HEADER], FrameError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(self.payload.len()));
        }
        let mut header = [0u8; HEADER];
        header[0] = self.kind as u8;
        header[1..5].copy_from_slice(&self.stream.to_be_bytes());
        header[5..9].copy_from_slice(&(self.payload.len() as u32).to_be_bytes());
        Ok(header)
    }

    /// The kind, stream and payload length a header announces.
    fn parse_header(header: &[u8; HEADER]) -> Result<(Kind, u32, usize), FrameError> {
        let kind = Kind::from_u8(header[0]).ok_or(FrameError::Kind(header[0]))?;
        let stream = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let len = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        Ok((kind, stream, len))
    }

    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        out.extend_from_slice(&self.header()?);
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// Takes the frame at the start of `buf` off it, its payload sharing
    /// `buf`'s memory; `Ok(None)` when `buf` ends inside it.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = buf.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let (kind, stream, len) = Frame::parse_header(header)?;
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        buf.advance(HEADER);
        Ok(Some(Frame::new(kind, stream, buf.split_to(len).freeze())))
    }

    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<(), FrameError> {
        w.write_all(&self.header()?).await?;
        w.write_all(&self.payload).await?;
        Ok(())
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream between frames.
    /// An end anywhere inside a frame, header or payload, is
    /// [`FrameError::Truncated`].
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
        let mut header = [0u8; HEADER];
        let mut got = 0;
        while got < header.len() {
            match r.read(&mut header[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(FrameError::Truncated),
                n => got += n,
            }
        }
        let (kind, stream, len) = Frame::parse_header(&header)?;
        let mut payload = vec![0u8; len];
        match r.read_exact(&mut payload).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Truncated),
            Err(e) => return Err(e.into()),
        }
        Ok(Some(Frame::new(kind, stream, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let frames = [
            Frame::new(Kind::Hello, 0, &b"token"[..]),
            Frame::new(Kind::Data, 7, vec![9u8; MAX_PAYLOAD]),
            Frame::new(Kind::Close, 7, Bytes::new()),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.write(&mut wire).await.unwrap();
        }
        let mut r = &wire[..];
        for f in &frames {
            assert_eq!(Frame::read(&mut r).await.unwrap().as_ref(), Some(f));
        }
        assert!(Frame::read(&mut r).await.unwrap().is_none(), "clean end between frames");

        assert!(matches!(
            Frame::new(Kind::Data, 1, vec![0u8; MAX_PAYLOAD + 1])
                .write(&mut Vec::new())
                .await,
            Err(FrameError::TooLarge(_))
        ));
        let lying = [5u8, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff];
        assert!(
            matches!(Frame::read(&mut &lying[..]).await, Err(FrameError::TooLarge(_))),
            "a length that lies is refused before allocating"
        );
        let unknown = [42u8, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            Frame::read(&mut &unknown[..]).await,
            Err(FrameError::Kind(42))
        ));
    }

    #[test]
    fn farewells_round_trip_and_unknown_ones_are_retried() {
        for f in [
            Farewell::Revoked("tunnel web is revoked".into()),
            Farewell::Refused("wrong secret: a:b".into()),
            Farewell::Busy("port 20000 is in use".into()),
            Farewell::Broken(String::new()),
        ] {
            assert_eq!(Farewell::from_payload(&f.to_payload()), f);
        }
        let odd = Farewell::from_payload(b"\xffgarbage");
        assert!(odd.retry_helps(), "{odd:?}");
        assert!(!Farewell::Revoked(String::new()).retry_helps());
    }

    #[tokio::test]
    async fn an_end_inside_a_frame_is_an_error_and_only_a_boundary_is_clean() {
        let frames = [
            Frame::new(Kind::Hello, 0, &b"token"[..]),
            Frame::new(Kind::Close, 7, Bytes::new()),
            Frame::new(Kind::Data, 3, vec![1u8; 300]),
        ];
        let mut wire = Vec::new();
        let mut boundaries = vec![0];
        for f in &frames {
            f.write(&mut wire).await.unwrap();
            boundaries.push(wire.len());
        }
        for cut in 0..=wire.len() {
            let mut r = &wire[..cut];
            let mut whole = 0;
            let end = loop {
                match Frame::read(&mut r).await {
                    Ok(Some(_)) => whole += 1,
                    other => break other,
                }
            };
            if boundaries.contains(&cut) {
                assert!(matches!(end, Ok(None)), "cut at {cut}: a clean end, got {end:?}");
                assert_eq!(boundaries[whole], cut);
            } else {
                assert!(
                    matches!(end, Err(FrameError::Truncated)),
                    "cut at {cut}, inside frame {whole}: {end:?}"
                );
            }
        }
    }
}
