//! The two byte-stream shims that carry the knock past rustls: the portal
//! reads a connection's first record itself and replays it, knock removed,
//! to its rustls; the client holds back its rustls's first record and sends
//! it with the knock inserted.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::client_hello::{MAX_RECORD_LEN, RECORD_HEADER_LEN, binding_nonce, insert_knock, record_len, strip_knock};
use crate::knock::wire::NONCE_LEN;

/// What the portal learned from the first record a client sent.
#[derive(Debug)]
pub struct Opening {
    /// The knock, if the record was a ClientHello carrying one.
    pub knock: Option<Carried>,
    /// What the portal's rustls must read first: the record without the
    /// knock, or whatever arrived if it was not a ClientHello we understand.
    pub replay: Vec<u8>,
}

/// A knock found in a ClientHello.
#[derive(Debug)]
pub struct Carried {
    /// The extension's data, byte-exact.
    pub knock: Vec<u8>,
    /// The nonce it must have for this ClientHello ([`binding_nonce`] of
    /// the record without it).
    pub binding: [u8; NONCE_LEN],
}

/// Reads the first record from `stream`, with whatever else arrived in the
/// same reads (replayed after it). A client that closes early or sends
/// something else gets no knock; its bytes are replayed so rustls can refuse
/// them in its own words. A client that sends nothing keeps this waiting, so
/// callers bound it with a timeout.
pub async fn read_opening<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Opening> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let want = record_len(&buf).map_or(RECORD_HEADER_LEN, |len| len.min(RECORD_HEADER_LEN + MAX_RECORD_LEN));
        if buf.len() >= want {
            break;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = record_len(&buf).map_or(buf.len(), |len| len.min(buf.len()));
    Ok(match strip_knock(&buf[..end]) {
        Ok(stripped) => {
            let knock = stripped.knock.map(|knock| Carried {
                knock,
                binding: binding_nonce(&stripped.record),
            });
            let mut replay = stripped.record;
            replay.extend_from_slice(&buf[end..]);
            Opening { knock, replay }
        }
        Err(_) => Opening {
            knock: None,
            replay: buf,
        },
    })
}

/// A stream that yields `replay` before the bytes still in `inner`.
pub struct Replayed<S> {
    replay: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replayed<S> {
    pub fn new(replay: Vec<u8>, inner: S) -> Replayed<S> {
        Replayed { replay, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.replay.len() {
            let n = (this.replay.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.replay[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    // rustls hands over a flight of records at once; one syscall for all
    // of them, as on a bare socket, saves a packet and a wakeup per record.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Seals the knock for a ClientHello record (see
/// [`super::client_hello::binding_nonce`]).
pub type Seal = Box<dyn FnOnce(&[u8]) -> io::Result<Vec<u8>> + Send + Sync>;

/// A stream that puts a knock, sealed for it, into the first record written
/// through it.
pub struct Knocking<S> {
    inner: S,
    state: Outbound,
}

enum Outbound {
    /// Collecting the first record; holds the sealer and what came so far.
    Holding {
        seal: Option<Seal>,
        held: Vec<u8>,
    },
    /// Sending the knocked record; `at` bytes of it are out.
    Sending {
        record: Vec<u8>,
        at: usize,
    },
    Passing,
}

impl<S> Knocking<S> {
    pub fn new(seal: Seal, inner: S) -> Knocking<S> {
        Knocking {
            inner,
            state: Outbound::Holding {
                seal: Some(seal),
                held: Vec::new(),
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> Knocking<S> {
    /// Sends what is left of the knocked record, if anything.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Outbound::Sending { record, at } = &mut self.state {
            if *at == record.len() {
                self.state = Outbound::Passing;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &record[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *at += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Knocking<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Knocking<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let Outbound::Holding { seal, held } = &mut this.state else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        let want = record_len(held).unwrap_or(RECORD_HEADER_LEN);
        let take = buf.len().min(want - held.len());
        held.extend_from_slice(&buf[..take]);
        if let Some(len) = record_len(held).filter(|len| *len == held.len()) {
            let seal = seal.take().ok_or(io::ErrorKind::InvalidInput)?;
            let knock = seal(&held[..len])?;
            let record = insert_knock(&held[..len], &knock)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("cannot carry the knock: {e}")))?;
            this.state = Outbound::Sending { record, at: 0 };
            // The caller's bytes are taken; a pending send finishes on flush or the next write.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(take))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.state, Outbound::Passing) {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        Pin::new(this).poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        time::timeout,
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector};
    use tunnel::tls::{Identity, client_config};

    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    /// A portal on loopback that accepts one connection, reports its
    /// opening, and echoes one message back over TLS if the handshake works.
    async fn portal(identity: &Identity) -> (std::net::SocketAddr, tokio::task::JoinHandle<io::Result<Opening>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(identity.server_config().unwrap());
        let served = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await?;
            let opening = read_opening(&mut tcp).await?;
            let mut tls = acceptor.accept(Replayed::new(opening.replay.clone(), tcp)).await?;
            let mut message = [0u8; 5];
            tls.read_exact(&mut message).await?;
            tls.write_all(&message).await?;
            tls.shutdown().await?;
            Ok(opening)
        });
        (addr, served)
    }

    async fn echo_through<S: AsyncRead + AsyncWrite + Unpin>(identity: &Identity, io: S) -> Vec<u8> {
        let connector = TlsConnector::from(client_config(identity.fingerprint()).unwrap());
        let name = ServerName::try_from("portal.test").unwrap();
        let mut tls = connector.connect(name, io).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        let mut back = Vec::new();
        tls.read_to_end(&mut back).await.unwrap();
        back
    }

    fn identity() -> Identity {
        Identity::generate(&["portal.test".to_string()]).unwrap()
    }

    #[tokio::test]
    async fn a_knocking_client_handshakes_and_the_portal_reads_its_knock() {
        let identity = identity();
        let (addr, served) = portal(&identity).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        // A stand-in knock that is just the binding: the portal must read
        // it byte-exact, and it must bind the very record rustls reads.
        let seal: Seal = Box::new(|record| Ok(binding_nonce(record).to_vec()));
        let back = timeout(LIMIT, echo_through(&identity, Knocking::new(seal, tcp)))
            .await
            .unwrap();
        assert_eq!(back, b"hello");
        let carried = served.await.unwrap().unwrap().knock.unwrap();
        assert_eq!(carried.knock, carried.binding.to_vec());
    }

    #[tokio::test]
    async fn bytes_after_the_client_hello_are_replayed_but_not_bound() {
        let identity = identity();
        let name = ServerName::try_from("portal.test").unwrap();
        let mut client = rustls::ClientConnection::new(client_config(identity.fingerprint()).unwrap(), name).unwrap();
        let mut record = Vec::new();
        client.write_tls(&mut record).unwrap();
        let mut wire = insert_knock(&record, b"knock").unwrap();
        wire.extend_from_slice(b"more");
        let opening = read_opening(&mut &wire[..]).await.unwrap();
        let carried = opening.knock.unwrap();
        assert_eq!(carried.knock, b"knock");
        assert_eq!(carried.binding, binding_nonce(&record));
        assert_eq!(opening.replay, [record, b"more".to_vec()].concat());
    }

    #[tokio::test]
    async fn a_stock_client_handshakes_without_a_knock() {
        let identity = identity();
        let (addr, served) = portal(&identity).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let back = timeout(LIMIT, echo_through(&identity, tcp)).await.unwrap();
        assert_eq!(back, b"hello");
        assert!(served.await.unwrap().unwrap().knock.is_none());
    }

    #[tokio::test]
    async fn plain_http_is_replayed_to_rustls_which_refuses_it() {
        let identity = identity();
        let (addr, served) = portal(&identity).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: portal\r\n\r\n").await.unwrap();
        tcp.shutdown().await.unwrap();
        let outcome = timeout(LIMIT, served).await.unwrap().unwrap();
        assert!(outcome.is_err(), "{outcome:?}");
    }
}
