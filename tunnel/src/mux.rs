//! Many streams inside one agent session. Each stream has its own window: a
//! sender may have at most [`WINDOW`] unacknowledged bytes in flight, so a
//! stream whose consumer is slow stops only itself, never the session.
//!
//! Only one side opens streams (the gateway, for each public connection,
//! [`Mux::opener`]); the other accepts them ([`Mux::acceptor`]). A stream
//! opened toward the opener is a protocol error: nothing there would ever
//! read it. Both sides answer pings.
//!
//! The session runs over [`crate::record`]'s halves: a reader task and a
//! writer task, so the two directions never wait on each other. The
//! acceptor (the agent) speaks first on the record layer; the opener writes
//! nothing until it has heard it, so no record of ours can reach the agent
//! while its TLS layer might still read it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{Semaphore, mpsc, oneshot, watch},
    task::JoinHandle,
};

use crate::{
    frame::{Farewell, Frame, Kind, MAX_PAYLOAD},
    record::{RecordError, RecordReader, RecordWriter},
};

/// Bytes a sender may have in flight per stream: enough to keep a
/// gigabit-class path full, and the most a stalled stream holds in memory.
pub const WINDOW: u32 = 1024 * 1024;

/// Pings a peer may send per second before the session is cut.
pub const MAX_PINGS_PER_SEC: u32 = 50;

#[derive(Debug, Error)]
pub enum MuxError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error("the peer ended the session: {0}")]
    Goodbye(Farewell),
    #[error("the session is closed")]
    Closed,
}

struct Slot {
    data: mpsc::UnboundedSender<Bytes>,
    /// What this side may still send.
    send_credit: Arc<Semaphore>,
    /// What the peer may still send; going below zero is a violation.
    recv_credit: Arc<AtomicI64>,
}

struct Shared {
    out: mpsc::Sender<Frame>,
    streams: Mutex<HashMap<u32, Slot>>,
    next_id: AtomicU32,
    last_heard: Mutex<Instant>,
    /// The last notice the peer sent.
    notice: watch::Sender<Bytes>,
}

impl Shared {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Streams the peer opened, each with the payload of its `Open` frame.
pub type Incoming = mpsc::Receiver<(MuxStream, Bytes)>;

/// The session's task: ends with why the session ended.
pub type SessionTask = JoinHandle<Result<(), MuxError>>;

/// A handle on a running session; cheap to clone.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

/// One stream. [`MuxStream::split`] gives halves that can be used at once,
/// as a relay must. Dropping both closes the stream.
pub struct MuxStream {
    reader: StreamReader,
    writer: StreamWriter,
}

/// Removes the stream from the session when the last half goes.
struct Registration {
    id: u32,
    shared: Arc<Shared>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.slots().remove(&self.id);
    }
}

pub struct StreamReader {
    data: mpsc::UnboundedReceiver<Bytes>,
    recv_credit: Arc<AtomicI64>,
    /// Consumed but not yet granted back; granted in batches, so a busy
    /// stream sends one window frame per quarter window, not per chunk.
    ungranted: u32,
    reg: Arc<Registration>,
}

pub struct StreamWriter {
    send_credit: Arc<Semaphore>,
    closed: bool,
    reg: Arc<Registration>,
}

impl Mux {
    /// Runs the opening side of a session over a record layer's halves:
    /// the handle to open streams with, and the session's task, which ends
    /// with why the session ended.
    pub fn opener<R, W>(rd: RecordReader<R>, wr: RecordWriter<W>) -> (Mux, SessionTask)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Mux::start(rd, wr, None)
    }

    /// Runs the accepting side of a session: also gives the streams the
    /// peer opens, with the payload of their `Open`.
    pub fn acceptor<R, W>(rd: RecordReader<R>, wr: RecordWriter<W>) -> (Mux, Incoming, SessionTask)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (accepted_tx, accepted) = mpsc::channel(64);
        let (mux, task) = Mux::start(rd, wr, Some(accepted_tx));
        (mux, accepted, task)
    }

    fn start<R, W>(
        mut rd: RecordReader<R>,
        mut wr: RecordWriter<W>,
        accepted: Option<mpsc::Sender<(MuxStream, Bytes)>>,
    ) -> (Mux, SessionTask)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, mut outbox) = mpsc::channel::<Frame>(1024);
        // The acceptor speaks first; the opener waits to hear it.
        let (mut heard_tx, heard) = if accepted.is_some() {
            let _ = out.try_send(Frame::new(Kind::Pong, 0, Bytes::new()));
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel::<()>();
            (Some(tx), Some(rx))
        };
        let shared = Arc::new(Shared {
            out,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            last_heard: Mutex::new(Instant::now()),
            notice: watch::channel(Bytes::new()).0,
        });
        let writer = tokio::spawn(async move {
            if let Some(heard) = heard
                && heard.await.is_err()
            {
                return Ok(());
            }
            // Every frame queued meanwhile goes into the same record.
            while let Some(frame) = outbox.recv().await {
                wr.push(&frame).await?;
                while let Ok(frame) = outbox.try_recv() {
                    wr.push(&frame).await?;
                }
                wr.flush().await?;
            }
            wr.shutdown().await
        });
        let reader_shared = shared.clone();
        let task = tokio::spawn(async move {
            let result = read_loop(&mut rd, &reader_shared, accepted.as_ref(), &mut heard_tx).await;
            // Wake every stream: their peer is gone.
            reader_shared.slots().clear();
            // Tell a peer that broke the protocol why it is cut off, giving
            // the writer a moment to send that before it stops.
            if let Err(MuxError::Protocol(why)) = &result
                && reader_shared
                    .out
                    .try_send(Frame::new(Kind::Goodbye, 0, Farewell::Broken(why.clone()).to_payload()))
                    .is_ok()
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            writer.abort();
            result
        });
        (Mux { shared }, task)
    }

    /// Opens a stream; `meta` travels in its `Open` frame.
    pub async fn open(&self, meta: Bytes) -> Result<MuxStream, MuxError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let stream = new_stream(&self.shared, id);
        self.shared
            .out
            .send(Frame::new(Kind::Open, id, meta))
            .await
            .map_err(|_| MuxError::Closed)?;
        Ok(stream)
    }

    /// Tells the peer the session ends, and why.
    pub async fn farewell(&self, why: &Farewell) -> Result<(), MuxError> {
        self.control(Kind::Goodbye, why.to_payload()).await
    }

    /// Sends a frame on the session itself (stream 0): pings, goodbyes.
    pub async fn control(&self, kind: Kind, payload: Bytes) -> Result<(), MuxError> {
        self.shared
            .out
            .send(Frame::new(kind, 0, payload))
            .await
            .map_err(|_| MuxError::Closed)
    }

    /// When the peer last sent anything.
    /// The notices the peer sends (`Kind::Notice`), latest first seen.
    pub fn notices(&self) -> watch::Receiver<Bytes> {
        self.shared.notice.subscribe()
    }

    pub fn last_heard(&self) -> Instant {
        *self.shared.last_heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams currently open.
    pub fn streams(&self) -> usize {
        self.shared.slots().len()
    }
}

fn new_stream(shared: &Arc<Shared>, id: u32) -> MuxStream {
    let (data_tx, data) = mpsc::unbounded_channel();
    let send_credit = Arc::new(Semaphore::new(WINDOW as usize));
    let recv_credit = Arc::new(AtomicI64::new(WINDOW as i64));
    shared.slots().insert(
        id,
        Slot {
            data: data_tx,
            send_credit: send_credit.clone(),
            recv_credit: recv_credit.clone(),
        },
    );
    let reg = Arc::new(Registration {
        id,
        shared: shared.clone(),
    });
    MuxStream {
        reader: StreamReader {
            data,
            recv_credit,
            ungranted: 0,
            reg: reg.clone(),
        },
        writer: StreamWriter {
            send_credit,
            closed: false,
            reg,
        },
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut RecordReader<R>,
    shared: &Arc<Shared>,
    accepted: Option<&mpsc::Sender<(MuxStream, Bytes)>>,
    heard: &mut Option<oneshot::Sender<()>>,
) -> Result<(), MuxError> {
    let (mut ping_window, mut pings) = (Instant::now(), 0u32);
    while let Some(frame) = rd.frame().await? {
        if let Some(heard) = heard.take() {
            let _ = heard.send(());
        }
        *shared.last_heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        match frame.kind {
            Kind::Ping => {
                // A peer that pings faster than any heartbeat needs is
                // flooding: answering would let it make us send as fast.
                let now = Instant::now();
                if now.duration_since(ping_window) >= Duration::from_secs(1) {
                    (ping_window, pings) = (now, 0);
                }
                pings += 1;
                if pings > MAX_PINGS_PER_SEC {
                    return Err(MuxError::Protocol(format!(
                        "more than {MAX_PINGS_PER_SEC} pings in a second: speaking too fast"
                    )));
                }
                shared
                    .out
                    .send(Frame::new(Kind::Pong, 0, frame.payload))
                    .await
                    .map_err(|_| MuxError::Closed)?
            }
            Kind::Pong => {}
            Kind::Notice => {
                shared.notice.send_replace(frame.payload);
            }
            Kind::Goodbye => return Err(MuxError::Goodbye(Farewell::from_payload(&frame.payload))),
            Kind::Open => {
                let Some(accepted) = accepted else {
                    return Err(MuxError::Protocol("streams are opened by the gateway only".into()));
                };
                if shared.slots().contains_key(&frame.stream) || frame.stream == 0 {
                    return Err(MuxError::Protocol(format!("stream {} opened twice", frame.stream)));
                }
                let stream = new_stream(shared, frame.stream);
                if accepted.send((stream, frame.payload)).await.is_err() {
                    return Err(MuxError::Closed);
                }
            }
            Kind::Data => {
                let slots = shared.slots();
                // Data for a stream this side already closed is dropped.
                if let Some(slot) = slots.get(&frame.stream) {
                    if slot.recv_credit.fetch_sub(frame.payload.len() as i64, Ordering::AcqRel)
                        < frame.payload.len() as i64
                    {
                        return Err(MuxError::Protocol(format!(
                            "stream {} sent past its window",
                            frame.stream
                        )));
                    }
                    let _ = slot.data.send(frame.payload);
                }
            }
            Kind::Window => {
                let grant = frame
                    .payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                let Some(grant) = grant else {
                    return Err(MuxError::Protocol("window frame without a size".into()));
                };
                if let Some(slot) = shared.slots().get(&frame.stream) {
                    slot.send_credit.add_permits(grant as usize);
                }
            }
            Kind::Close => {
                // Dropping the sender ends the stream's receiving side.
                if let Some(slot) = shared.slots().get_mut(&frame.stream) {
                    let (closed, _) = mpsc::unbounded_channel();
                    slot.data = closed;
                }
            }
            Kind::Hello | Kind::Welcome => {
                return Err(MuxError::Protocol(format!("{:?} inside a running session", frame.kind)));
            }
        }
    }
    Ok(())
}

impl MuxStream {
    pub fn id(&self) -> u32 {
        self.writer.reg.id
    }

    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }

    pub async fn send(&self, data: Bytes) -> Result<(), MuxError> {
        self.writer.send(data).await
    }

    pub async fn recv(&mut self) -> Option<Bytes> {
        self.reader.recv().await
    }

    pub async fn close(&mut self) {
        self.writer.close().await
    }
}

impl StreamWriter {
    /// Sends `data`, waiting for window as needed.
    pub async fn send(&self, mut data: Bytes) -> Result<(), MuxError> {
        let reg = &self.reg;
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_PAYLOAD).min(WINDOW as usize));
            let permits = self
                .send_credit
                .acquire_many(chunk.len() as u32)
                .await
                .map_err(|_| MuxError::Closed)?;
            permits.forget();
            reg.shared
                .out
                .send(Frame::new(Kind::Data, reg.id, chunk))
                .await
                .map_err(|_| MuxError::Closed)?;
        }
        Ok(())
    }

    /// Ends this side's sending.
    pub async fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = self
                .reg
                .shared
                .out
                .send(Frame::new(Kind::Close, self.reg.id, Bytes::new()))
                .await;
        }
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self
                .reg
                .shared
                .out
                .try_send(Frame::new(Kind::Close, self.reg.id, Bytes::new()));
        }
    }
}

impl StreamReader {
    /// The next bytes from the peer; `None` when the peer closed the stream
    /// or the session ended. Taking them returns window to the peer.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let data = self.data.recv().await?;
        self.ungranted += data.len() as u32;
        if self.ungranted >= WINDOW / 4 || self.data.is_empty() {
            let n = std::mem::take(&mut self.ungranted);
            self.recv_credit.fetch_add(n as i64, Ordering::AcqRel);
            let reg = &self.reg;
            let _ = reg
                .shared
                .out
                .send(Frame::new(Kind::Window, reg.id, n.to_be_bytes().to_vec()))
                .await;
        }
        Some(data)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sha2::{Digest, Sha256};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::{
        record::{SessionSecret, Side, leave_tls},
        tls::{Identity, client_config},
    };

    type Ends = (
        RecordReader<ReadHalf<DuplexStream>>,
        RecordWriter<WriteHalf<DuplexStream>>,
    );

    /// The gateway's and the agent's record layers over an in-memory pipe.
    fn ends() -> (Ends, Ends) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let secret = SessionSecret::from_bytes(&[1u8; 32]);
        let ((ar, aw), (br, bw)) = (tokio::io::split(a), tokio::io::split(b));
        (
            (
                RecordReader::new(ar, &secret, Side::Gateway),
                RecordWriter::new(aw, &secret, Side::Gateway),
            ),
            (
                RecordReader::new(br, &secret, Side::Agent),
                RecordWriter::new(bw, &secret, Side::Agent),
            ),
        )
    }

    /// Sends one frame as a peer that ignores the protocol would.
    async fn send_raw(wr: &mut RecordWriter<WriteHalf<DuplexStream>>, frame: Frame) -> Result<(), RecordError> {
        wr.push(&frame).await?;
        wr.flush().await
    }

    /// Two ends of a real TLS session on loopback, each running a mux. One
    /// byte from the gateway stands for the welcome: the turn that lets
    /// both ends leave TLS with nothing of the other's in flight.
    async fn pair() -> (Mux, (Mux, Incoming)) {
        let id = Identity::generate(&["gateway".into()]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(id.server_config().unwrap());
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(listener.accept().await.unwrap().0).await.unwrap();
            tls.write_all(b"w").await.unwrap();
            tls.flush().await.unwrap();
            tls
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("gateway").unwrap();
        let mut client = TlsConnector::from(client_config(id.fingerprint()).unwrap())
            .connect(name, tcp)
            .await
            .unwrap();
        client.read_exact(&mut [0u8; 1]).await.unwrap();
        let (rd, wr) = leave_tls(server.await.unwrap().into_inner(), Side::Gateway).unwrap();
        let (g, _) = Mux::opener(rd, wr);
        let (rd, wr) = leave_tls(client.into_inner(), Side::Agent).unwrap();
        let (a, a_in, _) = Mux::acceptor(rd, wr);
        (g, (a, a_in))
    }

    /// Echoes every stream the peer opens, until the session ends.
    /// How the session ended, waiting at most ten seconds.
    async fn ended(task: SessionTask) -> Result<(), MuxError> {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the session ends within ten seconds")
            .expect("the session task does not panic")
    }

    fn echo_all(mut incoming: Incoming, skip: Option<Bytes>) -> JoinHandle<Vec<MuxStream>> {
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((s, meta)) = incoming.recv().await {
                if Some(&meta) == skip.as_ref() {
                    // Accept, never read: a stalled consumer.
                    held.push(s);
                    continue;
                }
                tokio::spawn(async move {
                    let (mut rd, mut wr) = s.split();
                    while let Some(chunk) = rd.recv().await {
                        if wr.send(chunk).await.is_err() {
                            return;
                        }
                    }
                    wr.close().await;
                });
            }
            held
        })
    }

    fn payload(seed: u32, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
            .collect()
    }

    /// Sends `data` on a new stream and returns the SHA-256 of what came back.
    async fn round_trip(mux: Mux, meta: &'static [u8], data: Vec<u8>) -> [u8; 32] {
        let (mut rd, mut wr) = mux.open(Bytes::from_static(meta)).await.unwrap().split();
        let len = data.len();
        let send = async move {
            wr.send(Bytes::from(data)).await.unwrap();
            wr.close().await;
            wr
        };
        let receive = async move {
            let mut hash = Sha256::new();
            let mut got = 0;
            while got < len {
                let chunk = rd.recv().await.expect("the echo ends early");
                got += chunk.len();
                hash.update(&chunk);
            }
            hash.finalize().into()
        };
        let (_wr, digest) = tokio::join!(send, receive);
        digest
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_hundred_streams_of_a_megabyte_arrive_intact() {
        let (gw, (_agent, a_in)) = pair().await;
        let _echo = echo_all(a_in, None);
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let data = payload(i, 1 << 20);
            let want: [u8; 32] = Sha256::digest(&data).into();
            let gw = gw.clone();
            tasks.push(tokio::spawn(
                async move { (round_trip(gw, b"visitor", data).await, want) },
            ));
        }
        for t in tasks {
            let (got, want) = tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("bounded")
                .unwrap();
            assert_eq!(got, want);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_stream_does_not_stall_the_others() {
        let (gw, (_agent, a_in)) = pair().await;
        let _echo = echo_all(a_in, Some(Bytes::from_static(b"stalled")));
        let stalled = gw.open(Bytes::from_static(b"stalled")).await.unwrap();
        let blocked = tokio::spawn(async move { stalled.send(Bytes::from(vec![0u8; 4 << 20])).await });
        for i in 0..20 {
            let data = payload(i, 512 << 10);
            let want: [u8; 32] = Sha256::digest(&data).into();
            let got = tokio::time::timeout(Duration::from_secs(60), round_trip(gw.clone(), b"ok", data))
                .await
                .expect("others keep flowing");
            assert_eq!(got, want);
        }
        assert!(
            !blocked.is_finished(),
            "the stalled stream is held at its window, not buffered without bound"
        );
        blocked.abort();
    }

    #[tokio::test]
    async fn goodbye_ends_the_session_with_its_reason() {
        let ((grd, gwr), (ard, awr)) = ends();
        let (left, _) = Mux::opener(grd, gwr);
        let (_right, _, task) = Mux::acceptor(ard, awr);
        left.farewell(&Farewell::Revoked("tunnel web".into())).await.unwrap();
        let ended = ended(task).await;
        assert!(matches!(ended, Err(MuxError::Goodbye(Farewell::Revoked(w))) if w == "tunnel web"));
    }

    #[tokio::test]
    async fn a_stream_opened_toward_the_gateway_is_refused_not_parked() {
        let ((grd, gwr), (mut raw_rd, mut raw_wr)) = ends();
        let (_gw, task) = Mux::opener(grd, gwr);
        for id in 1..=100u32 {
            if send_raw(&mut raw_wr, Frame::new(Kind::Open, id, Bytes::new()))
                .await
                .is_err()
            {
                break;
            }
        }
        let ended = ended(task).await;
        assert!(
            matches!(&ended, Err(MuxError::Protocol(why)) if why.contains("gateway only")),
            "{ended:?}"
        );
        let told = raw_rd.frame().await.unwrap().expect("a goodbye first");
        assert_eq!(told.kind, Kind::Goodbye);
        assert!(matches!(Farewell::from_payload(&told.payload), Farewell::Broken(w) if w.contains("gateway only")));
    }

    #[tokio::test]
    async fn a_peer_that_pings_too_fast_is_cut_off() {
        let ((_raw_rd, mut raw_wr), (ard, awr)) = ends();
        let (_mux, _incoming, task) = Mux::acceptor(ard, awr);
        for _ in 0..=MAX_PINGS_PER_SEC {
            send_raw(&mut raw_wr, Frame::new(Kind::Ping, 0, Bytes::new()))
                .await
                .unwrap();
        }
        let ended = ended(task).await;
        assert!(
            matches!(&ended, Err(MuxError::Protocol(why)) if why.contains("too fast")),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_sending_past_its_window_is_cut_off() {
        let ((_raw_rd, mut raw_wr), (ard, awr)) = ends();
        let (_mux, mut incoming, task) = Mux::acceptor(ard, awr);
        send_raw(&mut raw_wr, Frame::new(Kind::Open, 1, Bytes::new()))
            .await
            .unwrap();
        let (_stream, _) = incoming.recv().await.unwrap();
        for _ in 0..(WINDOW as usize / MAX_PAYLOAD + 1) {
            send_raw(&mut raw_wr, Frame::new(Kind::Data, 1, vec![0u8; MAX_PAYLOAD]))
                .await
                .unwrap();
        }
        let ended = ended(task).await;
        assert!(matches!(ended, Err(MuxError::Protocol(_))), "{ended:?}");
    }
}
