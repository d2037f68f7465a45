//! Frames inside the agent's TLS session. Each is a 9-byte header (type,
//! stream id, payload length, big-endian) and up to [`MAX_PAYLOAD`] bytes.
//! Stream 0 is the session itself; public connections get ids from 1.

use bytes::Bytes;
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
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        [Hello, Welcome, Goodbye, Open, Data, Window, Close, Ping, Pong]
            .into_iter()
            .find(|k| *k as u8 == v)
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
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Frame {
    pub fn new(kind: Kind, stream: u32, payload: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            stream,
            payload: payload.into(),
        }
    }

    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<(), FrameError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(self.payload.len()));
        }
        let mut header = [0u8; 9];
        header[0] = self.kind as u8;
        header[1..5].copy_from_slice(&self.stream.to_be_bytes());
        header[5..9].copy_from_slice(&(self.payload.len() as u32).to_be_bytes());
        w.write_all(&header).await?;
        w.write_all(&self.payload).await?;
        Ok(())
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream between frames.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
        let mut header = [0u8; 9];
        match r.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let kind = Kind::from_u8(header[0]).ok_or(FrameError::Kind(header[0]))?;
        let stream = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let len = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        Ok(Some(Frame {
            kind,
            stream,
            payload: payload.into(),
        }))
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
        let truncated = &wire[..wire.len() - 1];
        let mut r = truncated;
        let mut last = None;
        while let Ok(Some(f)) = Frame::read(&mut r).await {
            last = Some(f);
        }
        assert_ne!(
            last.as_ref(),
            frames.last(),
            "a truncated final frame is never delivered whole"
        );
    }
}
